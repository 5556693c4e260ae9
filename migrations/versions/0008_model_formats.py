"""uploaded models may be Hugging Face folders (uploaded as archives) and GGUF files

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("safetensors",)
AFTER = ("safetensors", "hf-folder", "gguf")
NAME = "ck_uploaded_models_model_format"


def _one_of(values: tuple[str, ...]) -> str:
    return f"format IN ({', '.join(repr(v) for v in values)})"


def _replace_check(values: tuple[str, ...]) -> None:
    # batch mode: SQLite cannot alter a CHECK constraint in place; the table is copied
    with op.batch_alter_table("uploaded_models") as batch:
        batch.drop_constraint(op.f(NAME), type_="check")
        batch.create_check_constraint(op.f(NAME), _one_of(values))


def upgrade() -> None:
    _replace_check(AFTER)


def downgrade() -> None:
    # fails while models of the new formats are stored: delete them first (DELETE /v1/models/{id})
    _replace_check(BEFORE)
