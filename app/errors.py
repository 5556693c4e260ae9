"""RFC 9457 problem details: every error the API returns is `application/problem+json`
with a stable `type` URI, a `title`, the HTTP `status` and a `detail` naming what was wrong."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://qforge.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """Raise to answer with a problem document; `extra` adds extension members."""

    def __init__(
        self, status: int, slug: str, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.headers = headers
        self.extra = extra

    def response(self, request: Request | None = None) -> JSONResponse:
        body = {"type": PROBLEM_BASE + self.slug, "title": self.title, "status": self.status, "detail": self.detail}
        if request is not None:
            body["instance"] = request.url.path
        return JSONResponse(
            {**body, **self.extra}, status_code=self.status, media_type=PROBLEM_MEDIA_TYPE, headers=self.headers
        )


def job_not_found(job_id: str) -> Problem:
    return Problem(404, "job-not-found", "Job not found", f"no job with id '{job_id}'")


def dataset_not_found(dataset_id: str) -> Problem:
    return Problem(404, "dataset-not-found", "Dataset not found", f"no dataset with id '{dataset_id}'")


def model_not_found(model_id: str) -> Problem:
    return Problem(404, "model-not-found", "Model not found", f"no uploaded model with id '{model_id}'")


def validation_problem(
    errors: list[dict[str, Any]], slug: str = "validation-error", title: str = "Invalid request"
) -> Problem:
    """422 naming every bad field; `errors` holds each one's location and message."""
    listed = [{"loc": list(e["loc"]), "msg": _readable(e["msg"]), "type": e.get("type", "value_error")} for e in errors]
    detail = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in listed[:5])
    if len(listed) > 5:
        detail += f"; and {len(listed) - 5} more"
    return Problem(422, slug, title, detail, errors=listed)


def _readable(msg: str) -> str:
    # pydantic prefixes messages from our own validators with "Value error, ".
    return msg.removeprefix("Value error, ")


def _where(loc: list) -> str:
    parts = [str(p) for p in loc if p != "body"] or ["body"]
    return ".".join(parts)


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return exc.response(request)


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    malformed = [e for e in errors if e.get("type") == "json_invalid"]
    if malformed:
        ctx = malformed[0].get("ctx") or {}
        position = malformed[0]["loc"][-1] if len(malformed[0]["loc"]) > 1 else "?"
        reason = ctx.get("error", malformed[0]["msg"])
        detail = f"the request body is not valid JSON: {reason} (at character {position})"
        return Problem(400, "malformed-json", "Malformed JSON", detail).response(request)
    return validation_problem(errors).response(request)


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        problem = Problem(404, "not-found", "Not found", f"no resource at {request.url.path}")
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path}"
        problem = Problem(405, "method-not-allowed", "Method not allowed", detail)
    else:
        problem = Problem(exc.status_code, "http-error", str(exc.detail), str(exc.detail))
    problem.headers = dict(exc.headers or {})
    return problem.response(request)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    detail = "the server failed to handle the request; see its log"
    return Problem(500, "internal-error", "Internal server error", detail).response(request)


def install(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
