"""create the datasets and uploaded_models tables

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DATASET_FORMATS = ("npz", "jsonl")
DATASET_KINDS = ("arrays", "text")
MODEL_FORMATS = ("safetensors",)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("x_shape", sa.JSON(), nullable=True),
        sa.Column("has_labels", sa.Boolean(), nullable=False),
        sa.Column("classes", sa.Integer(), nullable=True),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.CheckConstraint(_one_of("format", DATASET_FORMATS), name=op.f("ck_datasets_dataset_format")),
        sa.CheckConstraint(_one_of("kind", DATASET_KINDS), name=op.f("ck_datasets_dataset_kind")),
    )
    op.create_index(op.f("ix_datasets_created_at"), "datasets", ["created_at"])
    op.create_table(
        "uploaded_models",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("architecture", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("tensors", sa.Integer(), nullable=False),
        sa.Column("parameters", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_uploaded_models")),
        sa.CheckConstraint(_one_of("format", MODEL_FORMATS), name=op.f("ck_uploaded_models_model_format")),
    )
    op.create_index(op.f("ix_uploaded_models_created_at"), "uploaded_models", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_uploaded_models_created_at", table_name="uploaded_models")
    op.drop_table("uploaded_models")
    op.drop_index("ix_datasets_created_at", table_name="datasets")
    op.drop_table("datasets")
