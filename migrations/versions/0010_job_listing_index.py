"""a tenant's jobs newest first from one index; the tenant-only index on jobs goes; the stored-artifacts index covers the storage sum

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

The job listing (GET /v1/jobs, the dashboard) reads a tenant's newest page. Through the
tenant index, the database fetched every job the tenant ever ran and sorted them for each
page; (tenant_id, created_at, id) hands it the page in order. ix_jobs_tenant_id is a prefix
of this index and of ix_jobs_tenant_status: every lookup it served, they serve, and each
insert paid for one more index. The partial index of jobs holding artifacts (0009) now holds
every column the storage quota's sum reads, so the sum reads the index alone: with only
tenant_id in it, SQLite (no statistics) chose the new listing index for that sum as readily,
reading every job of the tenant.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STORED_ARTIFACTS = sa.text("artifact_path IS NOT NULL AND artifacts_deleted_at IS NULL")


def _stored_artifacts_index(*columns: str) -> None:
    op.create_index("ix_jobs_tenant_stored_artifacts", "jobs", list(columns),
                    sqlite_where=STORED_ARTIFACTS, postgresql_where=STORED_ARTIFACTS)


def upgrade() -> None:
    op.drop_index("ix_jobs_tenant_stored_artifacts", table_name="jobs")
    _stored_artifacts_index("tenant_id", "artifacts_total_bytes", "artifact_bytes", "artifact_path", "artifacts_deleted_at")
    op.create_index("ix_jobs_tenant_created", "jobs", ["tenant_id", "created_at", "id"])
    op.drop_index("ix_jobs_tenant_id", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_tenant_id", "jobs", ["tenant_id"])
    op.drop_index("ix_jobs_tenant_created", table_name="jobs")
    op.drop_index("ix_jobs_tenant_stored_artifacts", table_name="jobs")
    _stored_artifacts_index("tenant_id")
