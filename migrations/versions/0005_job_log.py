"""the job_log table: each job's log lines, kept server-side

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEVELS = ("info", "warning", "error")


def upgrade() -> None:
    op.create_table(
        "job_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(32), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_log")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_log_job_id_jobs"), ondelete="CASCADE"),
        sa.CheckConstraint(f"level IN ({', '.join(repr(v) for v in LEVELS)})", name=op.f("ck_job_log_log_level")),
    )
    op.create_index("ix_job_log_job_id", "job_log", ["job_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_job_log_job_id", table_name="job_log")
    op.drop_table("job_log")
