"""Worker tests: a private data folder per test and a migrated SQLite database. Tasks run
in-process, with quantcore's `run_job` replaced where a test says so."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from app import crud
from app.core.db import new_session, session_scope
from app.models import DEFAULT_TENANT, Job
from quantcore.job import JobRequest

@pytest.fixture
def service_env() -> dict[str, str]:
    return {"QFORGE_JOB_HEARTBEAT_TIMEOUT": "30"}  # lost-worker tests wait less


@pytest.fixture
def new_job(settings):
    def create(**values) -> str:
        with new_session() as session:
            request = JobRequest(model="bundled:smollm2-135m", recipe="w4a16-rtn-g64")
            job, _ = crud.create_job(session, request, None, tenant_id=DEFAULT_TENANT)
        if values:
            with session_scope() as session:
                session.execute(update(Job).where(Job.id == job.id).values(**values))
        return job.id

    return create


@pytest.fixture
def load_job(settings):
    def load(job_id: str) -> Job:
        with new_session() as session:
            return session.get(Job, job_id)

    return load
