"""/v1/jobs: submit, list, inspect, follow, cancel, and fetch the report and artifact."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse
from sse_starlette import EventSourceResponse

from app import crud, jobs
from app.api.deps import JobDep, SessionDep, SettingsDep
from app.errors import Problem
from app.events import job_events
from app.models import JobStatus
from app.schemas import JobOut, JobPage
from quantcore.classic_job import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobOut)
def submit_job(
    request: JobSpec,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobOut:
    job, created = jobs.submit(session, request, idempotency_key, settings)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.from_row(job)


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobPage:
    items, total = crud.list_jobs(session, status, limit, offset)
    return JobPage(items=[JobOut.from_row(j) for j in items], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job: JobDep) -> JobOut:
    return JobOut.from_row(job)


@router.get("/{job_id}/events", response_class=EventSourceResponse)
def follow_job(job: JobDep) -> EventSourceResponse:
    """Server-sent events: `status` on each status change, `progress` in between; the
    stream ends after the event that shows the job finished."""
    return EventSourceResponse(job_events(job.id), ping=15)


@router.get("/{job_id}/report")
def get_report(job: JobDep) -> dict[str, Any]:
    jobs.require_status(job, JobStatus.SUCCEEDED, "report")
    return job.report or {}


@router.get("/{job_id}/artifact", response_class=FileResponse)
def download_artifact(
    job: JobDep,
    settings: SettingsDep,
    format: Annotated[str | None, Query(description="an exported format (the report's `artifacts`); default: the job's main one")] = None,
) -> FileResponse:
    jobs.require_status(job, JobStatus.SUCCEEDED, "artifact")
    assert job.artifact_path and job.artifact_sha256  # set together with status succeeded
    name, sha256, fmt = job.artifact_path, job.artifact_sha256, None
    if format is not None:
        exported = {a["format"]: a for a in (job.report or {}).get("artifacts", []) if "file" in a}
        if format not in exported:
            choices = ", ".join(exported) or "none"
            detail = f"job {job.id} has no '{format}' artifact; its formats: {choices}"
            raise Problem(404, "artifact-format-not-exported", "No artifact in that format", detail)
        name, sha256, fmt = exported[format]["file"], exported[format]["sha256"], format
    path = settings.artifact_dir / name
    if not path.is_file():
        detail = f"the artifact of job {job.id} is no longer in the artifact store"
        raise Problem(410, "artifact-gone", "Artifact gone", detail)
    # FileResponse streams the file and answers Range requests (206, 416) itself.
    return FileResponse(
        path,
        media_type="application/x-tar",
        filename=f"qforge-{job.id}.tar" if fmt is None else f"qforge-{job.id}-{fmt}.tar",
        headers={"X-Checksum-SHA256": sha256},
    )


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job: JobDep, session: SessionDep, response: Response) -> JobOut:
    """A queued job is cancelled at once (200); a running one stops at its worker's next
    progress report (202, `cancel_requested` set)."""
    job, was_running = jobs.cancel(session, job)
    # 202 for a running job even when its worker has stopped by now: the answer describes
    # what the request did, not a race with the worker
    response.status_code = 202 if was_running else 200
    return JobOut.from_row(job)
