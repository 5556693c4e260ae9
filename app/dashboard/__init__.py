"""The dashboard: server-rendered pages (Jinja2 templates, htmx for live updates) at `/`,
beside the REST API at `/v1`. No JavaScript build step: htmx and its SSE extension are
vendored under static/vendor."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from app.dashboard import pages, submit
from app.dashboard.auth import PageForbidden, SignInRequired, principal_of, sign_in_url
from app.dashboard.templating import HERE, page


async def _not_found(request: Request, exc: Exception):
    return page(request, "not_found.html", principal_of(request), status_code=404, message=str(exc))


async def _forbidden(request: Request, exc: Exception):
    return page(request, "forbidden.html", principal_of(request), status_code=403, message=str(exc))


async def _sign_in(request: Request, exc: Exception):
    assert isinstance(exc, SignInRequired)
    if request.headers.get("hx-request"):  # htmx swaps answers in place: have it load the page instead
        return RedirectResponse(sign_in_url(exc.next_path), status_code=303, headers={"HX-Redirect": "/sign-in"})
    return RedirectResponse(sign_in_url(exc.next_path), status_code=303)


def install(app: FastAPI) -> None:
    # submit first: its /jobs/new must win over the pages' /jobs/{job_id}
    app.include_router(submit.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(pages.PageNotFound, _not_found)
    app.add_exception_handler(PageForbidden, _forbidden)
    app.add_exception_handler(SignInRequired, _sign_in)
