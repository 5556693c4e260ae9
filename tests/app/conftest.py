"""API tests: a private data folder per test (SQLite database, SQLite broker, artifacts),
a migrated schema, and a TestClient. No worker runs: jobs stay queued unless a test moves
them on through the database."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app import tenants
from app.core.db import session_scope
from app.dashboard.auth import API_KEY_COOKIE
from app.models import DEFAULT_TENANT, Job, Scope


@pytest.fixture
def api_key(settings) -> str:
    """An admin key of the default tenant, as `qforge serve` makes on the embedded default."""
    with session_scope() as session:
        return tenants.create_key(session, DEFAULT_TENANT, Scope.ADMIN, "tests").secret


@pytest.fixture
def client(settings, api_key):
    """Signed in both ways: the key in the Authorization header (the API) and in the
    dashboard's cookie (its pages)."""
    from app.main import app

    with TestClient(app, headers={"Authorization": f"Bearer {api_key}"}) as test_client:
        test_client.cookies.set(API_KEY_COOKIE, api_key)
        yield test_client


@pytest.fixture
def job_count(settings):
    def count() -> int:
        with session_scope() as session:
            return session.scalar(select(func.count()).select_from(Job))

    return count


@pytest.fixture
def set_job(settings):
    """Move a job to any state directly, as a worker would."""

    def apply(job_id: str, **values) -> None:
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))

    return apply


SMOLLM = "bundled:smollm2-135m"


@pytest.fixture
def submit(client):
    def post(body: dict | None = None, **kwargs):
        body = body if body is not None else {"model": SMOLLM, "recipe": "w4a16-rtn-g64"}
        return client.post("/v1/jobs", json=body, **kwargs)

    return post
