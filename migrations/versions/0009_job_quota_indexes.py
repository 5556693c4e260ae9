"""indexes for a submission's quota check: a tenant's active jobs, and its jobs holding artifacts

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STORED_ARTIFACTS = sa.text("artifact_path IS NOT NULL AND artifacts_deleted_at IS NULL")


def upgrade() -> None:
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant_id", "status"])
    op.create_index("ix_jobs_tenant_stored_artifacts", "jobs", ["tenant_id"],
                    sqlite_where=STORED_ARTIFACTS, postgresql_where=STORED_ARTIFACTS)


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_stored_artifacts", table_name="jobs")
    op.drop_index("ix_jobs_tenant_status", table_name="jobs")
