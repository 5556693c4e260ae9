"""/v1/keys: a tenant's API keys, managed with an admin key of that tenant; /v1/me: the caller.

Tenants themselves, and the first key of each, are made by an operator with `qforge admin`."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from app import quotas, tenants
from app.api.deps import SessionDep, SettingsDep
from app.auth import AdminDep, CallerDep, authenticate
from app.core.db import with_request_session
from app.errors import Problem
from app.models import Tenant
from app.schemas import ApiKeyOut, ApiKeyRequest, Identity, NewApiKey

router = APIRouter(prefix="/v1", tags=["keys"], dependencies=[Depends(authenticate)])


@router.get("/me", response_model=Identity)
@with_request_session
def who_am_i(caller: CallerDep, session: SessionDep, settings: SettingsDep) -> Identity:
    """The tenant and scope of the key this call was made with, the tenant's limits and how
    much of them it uses."""
    limits = quotas.limits(session.get(Tenant, caller.tenant_id), settings)
    usage = quotas.usage(session, caller.tenant_id)
    return Identity(tenant=caller.tenant_id, key_id=caller.key_id, scope=caller.scope,
                    limits=dataclasses.asdict(limits), usage=dataclasses.asdict(usage))


@router.get("/keys", response_model=list[ApiKeyOut])
@with_request_session
def list_keys(caller: AdminDep, session: SessionDep, include_revoked: bool = False) -> list[ApiKeyOut]:
    return [ApiKeyOut.model_validate(k) for k in tenants.list_keys(session, caller.tenant_id, include_revoked)]


@router.post("/keys", status_code=201, response_model=NewApiKey)
@with_request_session
def create_key(body: ApiKeyRequest, caller: AdminDep, session: SessionDep, response: Response) -> NewApiKey:
    """A new key of the caller's tenant. The answer holds the key itself, the only time it is shown."""
    new = tenants.create_key(session, caller.tenant_id, body.scope, body.name)
    response.headers["Location"] = f"/v1/keys/{new.row.id}"
    return NewApiKey(**ApiKeyOut.model_validate(new.row).model_dump(), key=new.secret)


@router.delete("/keys/{key_id}", status_code=204)
@with_request_session
def revoke_key(key_id: Annotated[str, Path(max_length=64)], caller: AdminDep, session: SessionDep) -> None:
    """Revoke one of the tenant's keys (the caller's own too); it stops working at once."""
    if tenants.revoke_key(session, key_id, caller.tenant_id) is None:
        raise Problem(404, "key-not-found", "API key not found", f"no API key with id '{key_id}'")
