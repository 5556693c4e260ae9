"""Who is looking at the dashboard: the one place where its pages learn the caller.

A person signs in with an API key (POST /sign-in); the key is kept in the HttpOnly cookie
`API_KEY_COOKIE` (scripts on the page cannot read it) and checked on every request exactly as
the API checks its key header, so revoking a key signs its sessions out at once. A caller
without a valid key is sent to /sign-in.

Cross-site request forgery: the cookie is SameSite=Strict, so a browser never sends it with
a request another site starts; and a POST whose Origin (or Referer) names another site is
refused as well, for browsers that predate SameSite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app import logctx
from app.auth import caller_for_key
from app.core.db import get_session, with_request_session
from app.models import Scope

API_KEY_COOKIE = "qforge_api_key"
COOKIE_MAX_AGE_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # None: nobody signed in (only the sign-in and error pages render then)
    scope: Scope | None = None

    @property
    def signed_in(self) -> bool:
        return self.tenant is not None

    def can(self, scope: Scope) -> bool:
        return self.scope is not None and self.scope.allows(scope)


ANONYMOUS = Principal(tenant=None)


class SignInRequired(Exception):
    """Answered with a redirect to /sign-in, coming back to `next_path` afterwards."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class PageForbidden(Exception):
    """Answered with the dashboard's HTML 403 page."""


@with_request_session
def current_principal(request: Request, session: Annotated[Session, Depends(get_session)]) -> Principal:
    if request.method not in ("GET", "HEAD") and not same_origin(request):
        raise PageForbidden("This form was sent from another site; open the page here and send it again.")
    caller = caller_for_key(session, request.cookies.get(API_KEY_COOKIE))
    if caller is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(target if request.method == "GET" else "/")
    principal = Principal(caller.tenant_id, caller.scope)
    request.state.principal = principal
    logctx.bind(tenant_id=caller.tenant_id)
    return principal


def principal_of(request: Request) -> Principal:
    """The principal an earlier dependency of this request found, for error pages."""
    return getattr(request.state, "principal", ANONYMOUS)


def same_origin(request: Request) -> bool:
    """Whether an unsafe request comes from this site's own pages. With neither header (a
    non-browser client), it can only carry the cookie if its sender holds the key anyway."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    # the host only: behind a proxy that ends TLS the scheme seen here is http, the page's https
    return urlsplit(source).netloc == request.url.netloc


def safe_next(path: str | None) -> str:
    """Where to go after signing in: only a path on this site (never `//host` or a URL)."""
    if not path or not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    return path


def sign_in_url(next_path: str) -> str:
    return "/sign-in" if next_path == "/" else f"/sign-in?next={quote(next_path, safe='/')}"


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def requiring(scope: Scope):
    """A dependency: the signed-in principal, whose key must have `scope`."""

    def check(principal: PrincipalDep) -> Principal:
        if not principal.can(scope):
            raise PageForbidden(
                f"Your API key has scope '{principal.scope.value if principal.scope else 'none'}'; "
                f"this needs '{scope.value}'. Sign in with a key that has it."
            )
        return principal

    return check


SubmitterPrincipalDep = Annotated[Principal, Depends(requiring(Scope.SUBMIT))]
