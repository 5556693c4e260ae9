"""Alembic environment: the database URL comes from qforge's Settings (QFORGE_DATABASE_URL),
or from `app.core.db.migrate(url)`, never from an ini file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from app.core.config import get_settings
from app.core.db import engine_for
from app.models import Base

config = context.config
target_metadata = Base.metadata

# Any fixed number: every qforge process that migrates takes the same PostgreSQL advisory lock.
PG_MIGRATION_LOCK = 0x71F026E5


def _url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with engine_for(_url()).connect() as connection:
        # render_as_batch: SQLite can only alter a table by copying it; batch mode does that.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # The API and every worker migrate at start; the lock (released at commit)
                # makes them take turns instead of racing to create the same tables.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
