"""Who is calling: every API route but health and signed links depends on `authenticate`.

A caller presents its key as `Authorization: Bearer <key>` (or `X-API-Key: <key>`, for tools
that cannot set an Authorization header). The key names one tenant and one scope; routes that
change anything also depend on `require(Scope.SUBMIT)` or `require(Scope.ADMIN)`. Objects of
other tenants are never looked up at all (every query filters by `Caller.tenant_id`), so they
answer 404 exactly like objects that do not exist: a tenant cannot even learn that an id is
taken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app import logctx, quotas, tenants
from app.core.config import Settings, settings_dependency
from app.core.db import get_session, run_db
from app.errors import Problem
from app.models import Scope

log = logging.getLogger(__name__)

# auto_error=False: a missing key is answered by our own problem document, not FastAPI's
bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer qf_...`")
key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key, for clients that cannot send Bearer")


@dataclass(frozen=True)
class Caller:
    tenant_id: str
    key_id: str
    scope: Scope


def unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", "Unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="qforge"'})


def caller_for_key(session, presented: str | None) -> Caller | None:
    """The caller a presented key stands for, or None when it is not a live key."""
    if not presented:
        return None
    key = tenants.find_key(session, presented)
    return Caller(key.tenant_id, key.id, key.scope) if key is not None else None


async def authenticate(
    request: Request,
    session: Annotated[Session, Depends(get_session)],
    settings: Annotated[Settings, Depends(settings_dependency)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    header_key: Annotated[str | None, Depends(key_header)],
) -> Caller:
    presented = credentials.credentials if credentials is not None else header_key
    if not presented:
        raise unauthorized("this call needs an API key: send `Authorization: Bearer <key>`")
    key = await run_db(tenants.find_key, session, presented)
    if key is None:
        raise unauthorized("the API key is not valid: it was revoked, or never issued here")
    caller = Caller(key.tenant_id, key.id, key.scope)
    request.state.caller = caller
    logctx.bind(tenant_id=caller.tenant_id)  # on the request's log lines, its own included
    quotas.check_rate(key.tenant, key.tenant_id, settings)
    return caller


CallerDep = Annotated[Caller, Depends(authenticate)]


def require(scope: Scope) -> Callable[[Caller], Caller]:
    """A dependency that lets a caller through only with `scope` (or a broader one)."""

    async def check(caller: CallerDep) -> Caller:  # async: no I/O, so no trip to a worker thread
        if not caller.scope.allows(scope):
            detail = f"this call needs an API key with scope '{scope.value}'; this key has '{caller.scope.value}'"
            raise Problem(403, "insufficient-scope", "Insufficient scope", detail, required_scope=scope.value)
        return caller

    return check


SubmitterDep = Annotated[Caller, Depends(require(Scope.SUBMIT))]
AdminDep = Annotated[Caller, Depends(require(Scope.ADMIN))]
