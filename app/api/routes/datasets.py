"""/v1/datasets: upload calibration, training or evaluation data; list, inspect, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from app import crud, uploads
from app.api.deps import DatasetDep, SessionDep, SettingsDep
from app.core.db import with_request_session
from app.schemas import DatasetOut, DatasetPage
from app.auth import CallerDep, SubmitterDep, authenticate, require
from app.models import Dataset, Scope
from app.upload_stream import form_schema

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], dependencies=[Depends(authenticate)])

FORM = form_schema(
    'an .npz (arrays x and optional integer labels y) or a .jsonl file ({"x": [...], "y": 3} or {"text": "..."} '
    "per line), recognised by its content",
    name="shown in listings; default: the file's name",
)


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=FORM)
async def upload_dataset(
    request: Request, session: SessionDep, settings: SettingsDep, caller: SubmitterDep, response: Response
) -> DatasetOut:
    """Multipart form: `file` and an optional `name`. The file is checked before it is stored."""
    dataset = await uploads.receive_within_quota("dataset", request, session, settings, caller.tenant_id)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return DatasetOut.from_row(dataset)


@router.get("", response_model=DatasetPage)
@with_request_session
def list_datasets(
    session: SessionDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> DatasetPage:
    items, total = crud.list_uploads(session, Dataset, caller.tenant_id, limit, offset)
    return DatasetPage(items=[DatasetOut.from_row(d) for d in items], total=total, limit=limit, offset=offset)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset: DatasetDep) -> DatasetOut:
    return DatasetOut.from_row(dataset)


@router.delete("/{dataset_id}", status_code=204, dependencies=[Depends(require(Scope.SUBMIT))])
async def delete_dataset(dataset: DatasetDep, session: SessionDep, settings: SettingsDep) -> None:
    await uploads.delete(session, settings, dataset)
