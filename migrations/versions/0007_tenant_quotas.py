"""each tenant's own quotas (empty: the service's defaults); the bytes of all of a job's artifacts

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("max_active_jobs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("requests_per_minute", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("artifacts_total_bytes", sa.BigInteger(), nullable=True))
    # jobs that finished before: their main artifact is what is known of them
    op.execute(sa.text("UPDATE jobs SET artifacts_total_bytes = artifact_bytes WHERE artifact_bytes IS NOT NULL"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("artifacts_total_bytes")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("requests_per_minute")
        batch.drop_column("max_stored_bytes")
        batch.drop_column("max_active_jobs")
