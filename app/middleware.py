"""One ASGI middleware around every HTTP request: it gives the request an id (the client's
`X-Request-ID` when it sends a usable one), opens the request's log scope (request_id and
the ids in its path: job_id, dataset_id, model_id; a dependency may `bind` more, such as
tenant_id), and when the response is done writes one log line and observes the request in
the HTTP latency histogram, both under the route's template (`/v1/jobs/{job_id}`), never the
raw path, whose ids would make a new time series per job.

A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware: it passes streamed
responses (server-sent events, artifact downloads) through untouched.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import Depends, FastAPI, Request
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logctx
from app.metrics import HTTP_REQUEST_SECONDS

log = logging.getLogger("qforge.access")

REQUEST_ID_HEADER = "x-request-id"
_USABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
BOUND_PATH_PARAMS = ("job_id", "dataset_id", "model_id")
UNMATCHED = "<unmatched>"  # the route label of a request no route matched (a 404)
# Probes and scrapes, every few seconds: logged at DEBUG so they do not bury the requests.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


def route_of(scope: Scope) -> str:
    """The template of the route that handled the request, once the app has routed it
    (FastAPI puts the route in the scope; a mounted app, the static files, is named by its
    mount); UNMATCHED when no route matched."""
    route = scope.get("route")
    if route is not None:
        return route.path_format
    for mount in scope["app"].routes:
        if isinstance(mount, Mount) and scope.get("endpoint") is mount.app:  # the mount routed to its app
            return mount.path_format  # /static/{path}
    return UNMATCHED


async def bind_path_ids(request: Request) -> None:
    """A dependency of every route: the ids in the path, bound before the route's own
    dependencies and the route run, so their log lines carry them too. Async, so FastAPI
    runs it in the request's own task."""
    logctx.bind(**{name: str(request.path_params[name]) for name in BOUND_PATH_PARAMS if name in request.path_params})


class RequestObserver:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _request_id(scope)
        status = 500  # what the client gets if the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        with logctx.bound(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                seconds = time.perf_counter() - start
                method, route = scope["method"], route_of(scope)
                HTTP_REQUEST_SECONDS.labels(method, route, str(status)).observe(seconds)
                level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
                log.log(
                    level, "%s %s %d %.1f ms", method, scope["path"], status, seconds * 1000,
                    extra={"method": method, "route": route, "path": scope["path"], "status": status,
                           "duration_ms": round(seconds * 1000, 3)},
                )


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            if _USABLE_REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


def install(app: FastAPI) -> None:
    """Before the routers are included: they take the app's dependencies when included."""
    app.add_middleware(RequestObserver)
    app.router.dependencies.append(Depends(bind_path_ids))
