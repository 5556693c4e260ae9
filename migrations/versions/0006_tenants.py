"""tenants and API keys; jobs, datasets and models belong to a tenant

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

Rows that existed before tenants are given to the tenant `default`, which this migration
creates; an Idempotency-Key becomes unique per tenant instead of across the service.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCOPES = ("read", "submit", "admin")
DEFAULT_TENANT = "default"
OWNED = ("jobs", "datasets", "uploaded_models")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_api_keys_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        sa.CheckConstraint(f"scope IN ({', '.join(repr(s) for s in SCOPES)})", name=op.f("ck_api_keys_scope")),
    )
    op.create_index(op.f("ix_api_keys_tenant_id"), "api_keys", ["tenant_id"])
    op.execute(sa.text(f"INSERT INTO tenants (id, created_at) VALUES ('{DEFAULT_TENANT}', CURRENT_TIMESTAMP)"))

    for table in OWNED:
        # Added with a default so existing rows get the default tenant, which is then dropped:
        # new rows must always name their tenant.
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("tenant_id", sa.String(64), nullable=False, server_default=DEFAULT_TENANT))
        with op.batch_alter_table(table) as batch:
            batch.alter_column("tenant_id", server_default=None)
            batch.create_foreign_key(op.f(f"fk_{table}_tenant_id_tenants"), "tenants", ["tenant_id"], ["id"])
            batch.create_index(op.f(f"ix_{table}_tenant_id"), ["tenant_id"])
            if table == "jobs":
                batch.drop_constraint("uq_jobs_idempotency_key", type_="unique")
                batch.create_unique_constraint("uq_jobs_tenant_idempotency_key", ["tenant_id", "idempotency_key"])


def downgrade() -> None:
    for table in OWNED:
        with op.batch_alter_table(table) as batch:
            if table == "jobs":
                batch.drop_constraint("uq_jobs_tenant_idempotency_key", type_="unique")
                batch.create_unique_constraint("uq_jobs_idempotency_key", ["idempotency_key"])
            batch.drop_index(op.f(f"ix_{table}_tenant_id"))
            batch.drop_constraint(op.f(f"fk_{table}_tenant_id_tenants"), type_="foreignkey")
            batch.drop_column("tenant_id")
    op.drop_index(op.f("ix_api_keys_tenant_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
