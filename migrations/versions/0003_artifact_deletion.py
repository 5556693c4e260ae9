"""record when (and why) a job's artifacts were deleted from the artifact store

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot add columns with constraints in place
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("artifacts_deleted_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("artifacts_deleted_reason", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("artifacts_deleted_reason")
        batch.drop_column("artifacts_deleted_at")
