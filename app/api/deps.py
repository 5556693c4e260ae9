"""Dependencies shared by the routes, as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path
from sqlalchemy.orm import Session

from app import crud
from app.core.config import Settings, get_settings
from app.core.db import new_session
from app.errors import job_not_found
from app.models import Job


def get_session() -> Iterator[Session]:
    session = new_session()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_job(session: SessionDep, job_id: Annotated[str, Path(max_length=64)]) -> Job:
    """The job named in the path, or a 404 problem (before any response starts streaming)."""
    job = crud.get_job(session, job_id)
    if job is None:
        raise job_not_found(job_id)
    return job


JobDep = Annotated[Job, Depends(get_job)]
