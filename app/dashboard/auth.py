"""Who is looking at the dashboard: the one place where its pages learn the caller.

The service has no API keys yet (tenants and keys are their own issue), so there is nothing
to check and every caller is the open service's one anonymous principal. Every dashboard
route depends on `current_principal`; when keys land, this function alone changes: read
the key from the HttpOnly cookie `API_KEY_COOKIE` that the sign-in form will set, check it
as the API checks its key header, and send a caller without a valid one to /sign-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

API_KEY_COOKIE = "qforge_api_key"


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # None: the open service, with no tenants
    signed_in: bool


OPEN_SERVICE = Principal(tenant=None, signed_in=False)


def current_principal(request: Request) -> Principal:
    """The caller. Today always the open service: no key exists that could be checked, and
    accepting the cookie unchecked would only pretend to sign people in."""
    return OPEN_SERVICE


PrincipalDep = Annotated[Principal, Depends(current_principal)]
