"""/v1/models: upload a checkpoint in a format that cannot run code when loaded (an HF folder
of safetensors as .tar/.tar.gz/.zip, a GGUF file, or classic safetensors with a config naming
its architecture); list, inspect, delete. Pickles are refused."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from app import crud, uploads
from app.api.deps import SessionDep, SettingsDep, UploadedModelDep
from app.core.db import with_request_session
from app.schemas import ModelOut, ModelPage
from app.auth import CallerDep, SubmitterDep, authenticate, require
from app.models import Scope, UploadedModel
from app.upload_stream import form_schema

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(authenticate)])

FORM = form_schema(
    "a Hugging Face model folder (config.json, *.safetensors, tokenizer) as .tar, .tar.gz or .zip; a .gguf file; "
    "or a classic .safetensors checkpoint with `config`. Pickles (.pt, .pth, .bin, .ckpt, torch.save output) are "
    "refused with 415",
    config=f"classic .safetensors only, JSON: the architecture and its arguments, e.g. {uploads.CONFIG_EXAMPLE}",
    name="shown in listings; default: the file's name",
)


@router.post("", status_code=201, response_model=ModelOut, openapi_extra=FORM)
async def upload_model(
    request: Request, session: SessionDep, settings: SettingsDep, caller: SubmitterDep, response: Response
) -> ModelOut:
    """Multipart form: `file`, an optional `name`, and `config` for a classic safetensors file.
    The file is checked (an archive unpacked) before it is stored."""
    model = await uploads.receive_within_quota("model", request, session, settings, caller.tenant_id)
    response.headers["Location"] = f"/v1/models/{model.id}"
    return ModelOut.from_row(model)


@router.get("", response_model=ModelPage)
@with_request_session
def list_models(
    session: SessionDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ModelPage:
    items, total = crud.list_uploads(session, UploadedModel, caller.tenant_id, limit, offset)
    return ModelPage(items=[ModelOut.from_row(m) for m in items], total=total, limit=limit, offset=offset)


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model: UploadedModelDep) -> ModelOut:
    return ModelOut.from_row(model)


@router.delete("/{model_id}", status_code=204, dependencies=[Depends(require(Scope.SUBMIT))])
async def delete_model(model: UploadedModelDep, session: SessionDep, settings: SettingsDep) -> None:
    await uploads.delete(session, settings, model)
