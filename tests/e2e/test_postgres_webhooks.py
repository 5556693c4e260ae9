"""Migration 0004 and the webhook dispatcher's queries on a real PostgreSQL (the other tests
run them on SQLite)."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import delete, update

from app import crud
from app.core.db import _alembic_config, get_engine, new_session, session_scope
from app.models import DEFAULT_TENANT, Base, Job, JobStatus, WebhookDelivery, WebhookState, utcnow
from qforge.webhooks import verify_webhook
from quantcore.job import JobRequest
from worker import webhooks

pytestmark = [pytest.mark.services]


@pytest.fixture
def service_env(postgres_url):
    # a shared (PostgreSQL) deployment refuses loopback receivers unless told otherwise
    return {"QFORGE_DATABASE_URL": postgres_url, "QFORGE_WEBHOOK_SECRET": "pg-secret", "QFORGE_WEBHOOK_ALLOW_LOOPBACK": "true"}


def test_webhooks_migrate_and_deliver_on_postgres(settings, webhook_receiver):
    config = _alembic_config(settings.database_url)
    command.downgrade(config, "0003")
    command.upgrade(config, "head")
    with get_engine().connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata) == []

    receiver = webhook_receiver([503, 200])
    with new_session() as session:
        request = JobRequest(model="bundled:smollm2-135m", recipe="w4a16-rtn-g64")
        job, _ = crud.create_job(session, request, None, receiver.url, tenant_id=DEFAULT_TENANT)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job.id).values(status=JobStatus.FAILED, error="boom", finished_at=utcnow()))
    assert webhooks.dispatch_due() == 1
    with session_scope() as session:
        # the backoff has passed
        session.execute(update(WebhookDelivery).where(WebhookDelivery.job_id == job.id).values(next_attempt_at=utcnow()))
    assert webhooks.dispatch_due() == 1
    first, second = receiver.received()
    assert (first["status"], second["status"]) == (503, 200) and first["body"] == second["body"]
    event = verify_webhook("pg-secret", second["body"], second["headers"]["x-qforge-signature"])
    assert event["type"] == "job.failed" and event["job"]["error"] == "boom"
    with new_session() as session:
        delivery = session.get(Job, job.id).webhook
    assert delivery.state == WebhookState.DELIVERED and delivery.attempts == 2 and delivery.last_status == 200
    # the other tests share this database: leave no job behind (its event goes with it)
    with session_scope() as session:
        session.execute(delete(Job).where(Job.id == job.id))
    with new_session() as session:
        assert session.get(WebhookDelivery, delivery.id) is None
