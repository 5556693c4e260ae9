"""The migrations build exactly the schema app/models.py declares, and step down and back up."""

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.core.db import _alembic_config, get_engine
from app.models import Base


def test_the_migrated_schema_matches_the_models(settings):
    with get_engine().connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_uploads_migration_downgrades_and_upgrades(settings):
    config = _alembic_config(settings.database_url)
    command.downgrade(config, "0001")
    with get_engine().connect() as connection:
        assert set(inspect(connection).get_table_names()) == {"alembic_version", "jobs"}
    command.upgrade(config, "head")
    with get_engine().connect() as connection:
        tables = set(inspect(connection).get_table_names())
        checks = {c["name"] for c in inspect(connection).get_check_constraints("datasets")}
    assert {"datasets", "uploaded_models"} <= tables
    assert checks == {"ck_datasets_dataset_format", "ck_datasets_dataset_kind"}


def test_artifact_deletion_migration_downgrades_and_upgrades(settings):
    config = _alembic_config(settings.database_url)
    command.downgrade(config, "0002")
    with get_engine().connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("jobs")}
    assert "artifacts_deleted_at" not in columns and "artifact_path" in columns
    command.upgrade(config, "head")
    with get_engine().connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("jobs")}
    assert {"artifacts_deleted_at", "artifacts_deleted_reason"} <= columns


def test_webhooks_migration_downgrades_and_upgrades(settings):
    config = _alembic_config(settings.database_url)
    command.downgrade(config, "0003")
    with get_engine().connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("jobs")}
        tables = set(inspect(connection).get_table_names())
    assert "callback_url" not in columns and "artifacts_deleted_at" in columns
    assert "webhook_deliveries" not in tables
    command.upgrade(config, "head")
    with get_engine().connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("jobs")}
        checks = {c["name"] for c in inspect(connection).get_check_constraints("webhook_deliveries")}
        foreign = inspect(connection).get_foreign_keys("webhook_deliveries")
    assert "callback_url" in columns
    assert checks == {"ck_webhook_deliveries_webhook_state"}
    assert [(f["constrained_columns"], f["referred_table"]) for f in foreign] == [(["job_id"], "jobs")]


def test_job_log_migration_downgrades_and_upgrades(settings):
    config = _alembic_config(settings.database_url)
    command.downgrade(config, "0004")
    with get_engine().connect() as connection:
        tables = set(inspect(connection).get_table_names())
    assert "job_log" not in tables and "webhook_deliveries" in tables
    command.upgrade(config, "head")
    with get_engine().connect() as connection:
        checks = {c["name"] for c in inspect(connection).get_check_constraints("job_log")}
        foreign = inspect(connection).get_foreign_keys("job_log")
        indexes = {i["name"]: i["column_names"] for i in inspect(connection).get_indexes("job_log")}
    assert checks == {"ck_job_log_log_level"}
    assert [(f["constrained_columns"], f["referred_table"], f["options"].get("ondelete")) for f in foreign] == [
        (["job_id"], "jobs", "CASCADE")
    ]
    assert indexes == {"ix_job_log_job_id": ["job_id", "id"]}


def test_tenants_migration_gives_existing_rows_to_the_default_tenant(settings):
    from sqlalchemy import text

    config = _alembic_config(settings.database_url)
    command.downgrade(config, "0005")
    with get_engine().begin() as connection:
        assert "tenants" not in inspect(connection).get_table_names()
        connection.execute(text(
            "INSERT INTO jobs (id, status, model, recipe, request, progress_current, progress_total, progress_percent, "
            "progress_message, cancel_requested, attempts, created_at, updated_at, idempotency_key) VALUES "
            "('j1', 'queued', 'bundled:smollm2-135m', '{}', '{}', 0, 0, 0, '', 0, 0, '2026-01-01', '2026-01-01', 'k')"
        ))
    command.upgrade(config, "head")
    with get_engine().begin() as connection:
        assert connection.execute(text("SELECT id FROM tenants")).scalars().all() == ["default"]
        assert connection.execute(text("SELECT tenant_id FROM jobs WHERE id = 'j1'")).scalar() == "default"
        uniques = {u["name"]: u["column_names"] for u in inspect(connection).get_unique_constraints("jobs")}
        foreign = {f["referred_table"] for f in inspect(connection).get_foreign_keys("datasets")}
    assert uniques == {"uq_jobs_tenant_idempotency_key": ["tenant_id", "idempotency_key"]}
    assert foreign == {"tenants"}


def test_model_formats_migration_downgrades_and_upgrades(settings):
    def formats(connection) -> str:
        checks = inspect(connection).get_check_constraints("uploaded_models")
        return next(c["sqltext"] for c in checks if c["name"] == "ck_uploaded_models_model_format")

    config = _alembic_config(settings.database_url)
    command.downgrade(config, "0007")
    with get_engine().connect() as connection:
        assert "gguf" not in formats(connection) and "'safetensors'" in formats(connection)
    command.upgrade(config, "head")
    with get_engine().connect() as connection:
        assert all(f"'{v}'" in formats(connection) for v in ("safetensors", "hf-folder", "gguf"))


def test_job_listing_index_migration_downgrades_and_upgrades(settings):
    def job_indexes() -> dict[str, list[str]]:
        with get_engine().connect() as connection:
            return {i["name"]: i["column_names"] for i in inspect(connection).get_indexes("jobs")}

    config = _alembic_config(settings.database_url)
    command.downgrade(config, "0009")
    assert job_indexes()["ix_jobs_tenant_id"] == ["tenant_id"] and "ix_jobs_tenant_created" not in job_indexes()
    assert job_indexes()["ix_jobs_tenant_stored_artifacts"] == ["tenant_id"]
    command.upgrade(config, "head")
    assert job_indexes()["ix_jobs_tenant_created"] == ["tenant_id", "created_at", "id"]
    assert "ix_jobs_tenant_id" not in job_indexes()
    assert job_indexes()["ix_jobs_tenant_stored_artifacts"] == [
        "tenant_id", "artifacts_total_bytes", "artifact_bytes", "artifact_path", "artifacts_deleted_at"]


def test_a_tenants_newest_jobs_page_is_read_in_index_order_not_sorted(settings):
    """SQLite's own plan for the listing's page query, captured as crud.list_jobs sends it:
    the page comes from the (tenant, created_at, id) index, with no sort of the tenant's jobs."""
    from sqlalchemy import event

    from app import crud
    from app.core.db import session_scope

    sent: list[tuple[str, tuple]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _many) -> None:
        if "ORDER BY" in statement:
            sent.append((statement, parameters))

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_scope() as session:
            crud.list_jobs(session, "default", None, limit=20, offset=0)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    [(statement, parameters)] = sent
    with engine.connect() as connection:
        plan = " | ".join(row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters))
    assert "ix_jobs_tenant_created" in plan, plan
    assert "TEMP B-TREE" not in plan, plan
