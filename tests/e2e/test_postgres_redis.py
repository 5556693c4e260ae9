"""The production shape end to end: the same `qforge serve`, configured only by QFORGE_*
variables, against a real PostgreSQL and Redis that the fixtures start and stop."""

import pytest

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_job_runs_against_postgres_and_redis(start_service, postgres_url, redis_url, main_job):
    client = start_service({"QFORGE_DATABASE_URL": postgres_url, "QFORGE_BROKER_URL": redis_url})
    ready = client.get("/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok"}
    job = main_job(client)
    assert job["attempts"] == 1
    listed = client.get("/v1/jobs", params={"status": "succeeded"}).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]
