"""The dashboard: server-rendered pages (Jinja2 templates, htmx for live updates) at `/`,
beside the REST API at `/v1`. No JavaScript build step: htmx and its SSE extension are
vendored under static/vendor."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from app.dashboard import pages, submit
from app.dashboard.auth import current_principal
from app.dashboard.templating import HERE, page


async def _not_found(request: Request, exc: Exception):
    return page(request, "not_found.html", current_principal(request), status_code=404, message=str(exc))


def install(app: FastAPI) -> None:
    # submit first: its /jobs/new must win over the pages' /jobs/{job_id}
    app.include_router(submit.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(pages.PageNotFound, _not_found)
