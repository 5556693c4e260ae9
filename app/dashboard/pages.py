"""The dashboard's pages: the job list, a job, its report, a comparison, sign-in.

Routes are thin, as the API's are: they read through `app.crud`, act through `app.jobs`
and `app.artifacts`, and render the API's own `JobOut` with the stored report.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Header, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sse_starlette import EventSourceResponse

from app import artifacts, joblog, jobs
from app.api.deps import SessionDep, SettingsDep
from app.artifact_store import store_for
from app.core.db import with_request_session
from app.crud import get_job
from app.dashboard import charts, live
from app.auth import caller_for_key
from app.dashboard.auth import (
    ANONYMOUS, API_KEY_COOKIE, COOKIE_MAX_AGE_S, Principal, PrincipalDep, SubmitterPrincipalDep, safe_next, same_origin,
)
from app.dashboard.templating import page
from app.dashboard.views import delta_rows, metric_rows, size_rows, stage_bars, timing_rows
from app.errors import Problem
from app.models import Job, JobStatus
from app.schemas import JobLogLine, JobOut

router = APIRouter(include_in_schema=False)
PAGE_SIZES = (10, 20, 50, 100)
MAX_COMPARED = 6


class PageNotFound(Exception):
    """Answered with the dashboard's HTML 404 page (the API answers problem+json)."""


def load_job(session, job_id: str, principal: Principal) -> Job:
    """The principal's job; another tenant's is "not found", as in the API."""
    job = get_job(session, job_id, principal.tenant) if len(job_id) <= 64 else None
    if job is None:
        raise PageNotFound(f"No job with id {job_id[:64]}.")
    return job


@router.get("/", response_class=HTMLResponse)
def job_list(
    request: Request,
    principal: PrincipalDep,
    status: JobStatus | None = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
):
    filters = {k: v for k, v in {"status": status.value if status else "", "model": model or "", "limit": limit}.items() if v}
    return page(
        request, "jobs.html", principal, **live.list_page(principal.tenant, status, model or None, limit, offset), status=status,
        model=model or "", statuses=list(JobStatus), page_sizes=PAGE_SIZES,
        live_url="/jobs/live?" + urlencode({**filters, "offset": offset}),
    )


@router.get("/jobs/live")
def job_list_live(
    principal: PrincipalDep,
    status: JobStatus | None = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> EventSourceResponse:
    return EventSourceResponse(live.job_list_events(principal.tenant, status, model or None, limit, offset), ping=15)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
@with_request_session
def job_page(request: Request, job_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep):
    job = JobOut.from_row(load_job(session, job_id, principal), settings)
    # the whole stored log (at most job_log_max_lines); the live stream goes on after its last line
    log = [JobLogLine.from_row(row) for row in joblog.read(session, job.id, limit=None)]
    return page(request, "job.html", principal, job=job, bars=stage_bars(job), log=log,
                log_after=log[-1].seq if log else 0)


@router.get("/jobs/{job_id}/live")
@with_request_session
def job_live(
    job_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    after: Annotated[int, Query(ge=0)] = 0,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> EventSourceResponse:
    """`after`: the page's last log line; a reconnecting browser's Last-Event-ID (the last
    line it received) goes further."""
    job = load_job(session, job_id, principal)
    if last_event_id is not None and last_event_id.isdigit():
        after = max(after, int(last_event_id))
    return EventSourceResponse(live.job_page_events(job.id, after), ping=15)


@router.post("/jobs/{job_id}/cancel")
@with_request_session
def cancel(job_id: str, principal: SubmitterPrincipalDep, session: SessionDep):
    job = load_job(session, job_id, principal)
    try:
        jobs.cancel(session, job)
    except Problem:  # finished meanwhile: the job page shows how it ended
        pass
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.get("/jobs/{job_id}/report", response_class=HTMLResponse)
@with_request_session
def report_page(request: Request, job_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep):
    row = load_job(session, job_id, principal)
    job = JobOut.from_row(row, settings)
    if job.status != JobStatus.SUCCEEDED:
        return page(request, "report_missing.html", principal, status_code=409, job=job)
    report = row.report or {}
    errors = charts.layer_errors(report.get("layers") or [])
    return page(
        request, "report.html", principal, job=job, report=report,
        metrics=metric_rows(report), deltas=delta_rows(report), sizes=size_rows(report), timings=timing_rows(report),
        chart=charts.layer_error_svg(errors, "chart-" + job.id), errors=errors,
    )


@router.get("/jobs/{job_id}/download")
@with_request_session
def download(
    job_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    format: Annotated[str | None, Query(max_length=64)] = None,
    range: Annotated[str | None, Header()] = None,
) -> Response:
    """The artifact through the dashboard's own route, so a download passes the same
    `current_principal` as the pages (the API's route takes the key from a header instead)."""
    job = load_job(session, job_id, principal)
    return artifacts.artifact_response(store_for(settings), artifacts.find_artifact(job, format), range)


@router.get("/compare", response_class=HTMLResponse)
@with_request_session
def compare(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    id: Annotated[list[str], Query()] = [],  # noqa: B006 - FastAPI copies defaults
):
    ids = list(dict.fromkeys(id))[:MAX_COMPARED]  # each job once, in the order chosen
    columns = []
    for job_id in ids:
        row = load_job(session, job_id, principal)
        report = row.report if row.status == JobStatus.SUCCEEDED else None
        columns.append({
            "job": JobOut.from_row(row, settings), "report": report,
            "metrics": {m.name: m for m in metric_rows(report or {})},
            "sizes": {label: (kind, value) for label, kind, value in size_rows(report or {})},
            "timings": dict(timing_rows(report or {})),
            "errors": charts.layer_errors((report or {}).get("layers") or []),
        })
    scale = charts.error_scale([c["errors"] for c in columns])
    for c in columns:
        c["chart"] = charts.layer_error_svg(c["errors"], "chart-" + c["job"].id, y_max=scale)
    return page(
        request, "compare.html", principal, columns=columns, max_compared=MAX_COMPARED,
        metric_names=_union(c["metrics"] for c in columns), size_labels=_union(c["sizes"] for c in columns),
        timing_names=_union(c["timings"] for c in columns),
    )


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in(request: Request, next: Annotated[str | None, Query(max_length=2000)] = None):
    return page(request, "sign_in.html", ANONYMOUS, next=safe_next(next))


@router.post("/sign-in", response_class=HTMLResponse)
@with_request_session
def sign_in_with_key(
    request: Request,
    session: SessionDep,
    api_key: Annotated[str, Form(max_length=512)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/",
):
    """Check the key as the API would, then keep it in the HttpOnly cookie."""
    if not same_origin(request):
        return page(request, "sign_in.html", ANONYMOUS, status_code=403, next=safe_next(next),
                    error="This form was sent from another site; sign in from this page.")
    caller = caller_for_key(session, api_key.strip())
    if caller is None:
        return page(request, "sign_in.html", ANONYMOUS, status_code=401, next=safe_next(next),
                    error="That API key is not valid here: it was revoked, mistyped, or issued by another service.")
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(
        API_KEY_COOKIE, api_key.strip(), max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/",
    )
    return response


@router.post("/sign-out")
def sign_out(request: Request):
    response = RedirectResponse("/sign-in", status_code=303)
    if same_origin(request):  # another site must not be able to sign people out either
        response.delete_cookie(API_KEY_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def _union(dicts) -> list[str]:
    return list(dict.fromkeys(key for d in dicts for key in d))
