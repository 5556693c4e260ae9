"""Dependencies shared by the routes, as `Annotated` aliases.

Every object a route names in its path is looked up within the caller's tenant: another
tenant's job, dataset or model is "not found", exactly like one that does not exist."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path
from sqlalchemy.orm import Session

from app import crud
from app.core.config import Settings, settings_dependency
from app.auth import CallerDep
from app.core.db import get_session, run_db
from app.errors import dataset_not_found, job_not_found, model_not_found
from app.models import Dataset, Job, UploadedModel

SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(settings_dependency)]


async def get_job(session: SessionDep, caller: CallerDep, job_id: Annotated[str, Path(max_length=64)]) -> Job:
    """The job named in the path, or a 404 problem (before any response starts streaming)."""
    job = await run_db(crud.get_job, session, job_id, caller.tenant_id)
    if job is None:
        raise job_not_found(job_id)
    return job


JobDep = Annotated[Job, Depends(get_job)]


async def get_dataset(session: SessionDep, caller: CallerDep, dataset_id: Annotated[str, Path(max_length=64)]) -> Dataset:
    dataset = await run_db(crud.get_upload, session, Dataset, dataset_id, caller.tenant_id)
    if dataset is None:
        raise dataset_not_found(dataset_id)
    return dataset


DatasetDep = Annotated[Dataset, Depends(get_dataset)]


async def get_uploaded_model(session: SessionDep, caller: CallerDep, model_id: Annotated[str, Path(max_length=64)]) -> UploadedModel:
    model = await run_db(crud.get_upload, session, UploadedModel, model_id, caller.tenant_id)
    if model is None:
        raise model_not_found(model_id)
    return model


UploadedModelDep = Annotated[UploadedModel, Depends(get_uploaded_model)]
