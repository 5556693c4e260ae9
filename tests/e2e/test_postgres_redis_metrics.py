"""GET /metrics on the production stores: the job duration arithmetic in PostgreSQL's SQL
(the other tests run SQLite's), and the queue depth read from Redis's lists. The session's
database and Redis are shared with other tests: what this test adds is compared."""

import datetime as dt

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import crud, queue
from app.core.db import new_session
from app.models import DEFAULT_TENANT, JobStatus
from quantcore.job import JobRequest

RTN_JOB = JobRequest(model="bundled:smollm2-135m", recipe="w4a16-rtn-g64")

pytestmark = [pytest.mark.services]

SUCCEEDED = frozenset({("status", "succeeded")})
QUEUE = frozenset({("queue", "qforge.jobs")})


@pytest.fixture
def service_env(postgres_url, redis_url):
    return {"QFORGE_DATABASE_URL": postgres_url, "QFORGE_BROKER_URL": redis_url}


def scrape(client) -> dict:
    text = client.get("/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_job_durations_on_postgres_and_queue_depth_on_redis(settings):
    from app.main import app

    start = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)
    durations = [2.5, 42.0, 4000.0]
    with TestClient(app) as client:
        before = scrape(client)
        with new_session() as session:
            for seconds in durations:
                job, _ = crud.create_job(session, RTN_JOB, None, tenant_id=DEFAULT_TENANT)
                job.status, job.attempts = JobStatus.SUCCEEDED, 1
                job.started_at, job.finished_at = start, start + dt.timedelta(seconds=seconds)
                session.commit()
        for _ in range(4):
            queue.enqueue("e" * 32)
        after = scrape(client)

    def added(name: str, labels: frozenset) -> float:
        return after[(name, labels)] - before[(name, labels)]

    assert added("qforge_job_duration_seconds_count", SUCCEEDED) == 3
    assert added("qforge_job_duration_seconds_sum", SUCCEEDED) == pytest.approx(sum(durations))
    assert added("qforge_job_duration_seconds_bucket", SUCCEEDED | {("le", "60.0")}) == 2
    assert added("qforge_job_duration_seconds_bucket", SUCCEEDED | {("le", "3600.0")}) == 2
    assert added("qforge_jobs", SUCCEEDED) == 3
    assert after[("qforge_broker_up", frozenset())] == 1
    assert added("qforge_queue_depth", QUEUE) == 4
