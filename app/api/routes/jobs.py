"""/v1/jobs: submit, list, inspect, follow, read the log, cancel, and fetch the report and artifact.

The calls a pipeline makes over and over (submit, list, poll, read the log, cancel) are async
routes whose database work is one `run_db` call, on the event loop (app.core.db): FastAPI
runs a plain route in a thread and then validates its answer in another, and under load every
trip waits for the GIL behind the other requests' threads (at 50 clients, most of a
submission's latency).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import FileResponse
from sse_starlette import EventSourceResponse

from app import artifacts, crud, joblog, jobs, try_model
from app.artifact_store import ArtifactStoreError, store_for
from app.api.deps import JobDep, SessionDep, SettingsDep
from app.core.db import run_db, with_request_session
from app.auth import CallerDep, SubmitterDep, authenticate, require
from app.errors import validation_problem
from app.events import job_events
from app.models import JobStatus, Scope
from app.schemas import ArtifactLink, ArtifactLinkRequest, JobLogLine, JobLogPage, JobOut, JobPage
from app.try_model import TryRequest
from app.webhooks import SubmissionSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(authenticate)])
# on the routes that change something, beside the read access every route needs
SUBMIT = [Depends(require(Scope.SUBMIT))]


@router.post("", status_code=202, response_model=JobOut)
async def submit_job(
    request: SubmissionSpec,
    session: SessionDep,
    settings: SettingsDep,
    caller: SubmitterDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobOut:
    job, created = await run_db(jobs.submit, session, request, idempotency_key, settings, caller.tenant_id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.from_row(job, settings)


@router.get("", response_model=JobPage)
async def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobPage:
    items, total = await run_db(crud.list_jobs, session, caller.tenant_id, status, limit, offset)
    return JobPage(items=[JobOut.from_row(j, settings) for j in items], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job: JobDep, settings: SettingsDep) -> JobOut:
    return JobOut.from_row(job, settings)


@router.get("/{job_id}/events", response_class=EventSourceResponse)
def follow_job(job: JobDep) -> EventSourceResponse:
    """Server-sent events: `status` on each status change, `progress` in between, `log` for
    each new log line; the stream ends after the event that shows the job finished."""
    return EventSourceResponse(job_events(job.id), ping=15)


@router.get("/{job_id}/logs", response_model=JobLogPage)
async def job_logs(
    job: JobDep,
    session: SessionDep,
    after: Annotated[int, Query(ge=0, description="the last seq already read; 0: from the first kept line")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobLogPage:
    lines = [JobLogLine.from_row(row) for row in await run_db(joblog.read, session, job.id, after, limit)]
    return JobLogPage(items=lines, next_after=lines[-1].seq if lines else after)


@router.get("/{job_id}/report")
def get_report(job: JobDep) -> dict[str, Any]:
    jobs.require_status(job, JobStatus.SUCCEEDED, "report")
    return job.report or {}


@router.get("/{job_id}/artifact", response_class=FileResponse)
def download_artifact(
    job: JobDep,
    settings: SettingsDep,
    range: Annotated[str | None, Header(description="bytes=first-last, to resume or fetch part of the file")] = None,
    format: Annotated[str | None, Query(description="an exported format (the report's `artifacts`); default: the job's main one")] = None,
) -> Response:
    """The artifact as a tar, streamed; `X-Checksum-SHA256` is its sha256 (the whole file's)."""
    return artifacts.artifact_response(store_for(settings), artifacts.find_artifact(job, format), range)


@router.post("/{job_id}/artifact/link", response_model=ArtifactLink)
def link_artifact(job: JobDep, settings: SettingsDep, request: Request, body: ArtifactLinkRequest | None = None) -> ArtifactLink:
    """A time-limited download link that needs no credentials, to hand to a deployment."""
    body = body or ArtifactLinkRequest()
    if body.expires_in > settings.artifact_link_max_seconds:
        message = f"links last at most {settings.artifact_link_max_seconds} seconds here"
        raise validation_problem([{"loc": ["body", "expires_in"], "msg": message, "type": "less_than_equal"}])
    artifact = artifacts.find_artifact(job, body.format)
    url, expires_at = artifacts.signed_link(settings, artifact, body.expires_in, str(request.base_url))
    return ArtifactLink(url=url, expires_at=expires_at, format=artifact.format, sha256=artifact.sha256, bytes=artifact.bytes)


@router.delete("/{job_id}/artifacts", response_model=JobOut, dependencies=SUBMIT)
@with_request_session
def delete_artifacts(job: JobDep, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Delete every artifact of a finished job from the store; the job and its report stay.
    Repeating it is harmless."""
    jobs.require_status(job, JobStatus.SUCCEEDED, "artifact")
    try:
        artifacts.delete_artifacts(session, job, store_for(settings), "request")
    except ArtifactStoreError as exc:
        raise artifacts.store_unavailable(exc) from None
    session.refresh(job)
    return JobOut.from_row(job, settings)


@router.post("/{job_id}/try", dependencies=SUBMIT)
def try_job(job: JobDep, settings: SettingsDep, body: TryRequest | None = None) -> dict[str, Any]:
    """Generate with the job's quantized LLM on the fast CPU paths: the text, prefill time and
    decode tokens/s (with `compare_float`, the float source model's beside it). Runs in the
    API process, one generation at a time: a quick look, not a serving endpoint."""
    jobs.require_status(job, JobStatus.SUCCEEDED, "artifact")
    return try_model.try_job(settings, job, body or TryRequest())


@router.post("/{job_id}/cancel", response_model=JobOut, dependencies=SUBMIT)
async def cancel_job(job: JobDep, session: SessionDep, settings: SettingsDep, response: Response) -> JobOut:
    """A queued job is cancelled at once (200); a running one stops within about a
    second (202, `cancel_requested` set)."""
    job, was_running = await run_db(jobs.cancel, session, job)
    # 202 for a running job even when its worker has stopped by now: the answer describes
    # what the request did, not a race with the worker
    response.status_code = 202 if was_running else 200
    return JobOut.from_row(job, settings)
