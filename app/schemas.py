"""What the API returns. A job is shown with its progress and, once archived, its artifact."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, Field

from app.models import Job, JobStatus


class JobProgress(BaseModel):
    stage: str | None = Field(None, description="load, baseline, quantize, evaluate or export")
    current: int = Field(0, description="step within the stage, e.g. layer i of N")
    total: int = 0
    percent: float = Field(0.0, description="of the whole job")
    message: str = ""


class ArtifactInfo(BaseModel):
    url: str
    sha256: str
    bytes: int


class JobOut(BaseModel):
    id: str
    status: JobStatus
    model: str
    recipe: dict[str, Any] = Field(description="the recipe as run, with every default filled in")
    request: dict[str, Any]
    progress: JobProgress
    error: str | None = Field(None, description="why the job failed, for a person to read")
    cancel_requested: bool
    attempts: int
    artifact: ArtifactInfo | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime
    heartbeat_at: dt.datetime | None

    @classmethod
    def from_row(cls, job: Job) -> JobOut:
        artifact = None
        if job.artifact_path and job.artifact_sha256 and job.artifact_bytes is not None:
            artifact = ArtifactInfo(
                url=f"/v1/jobs/{job.id}/artifact", sha256=job.artifact_sha256, bytes=job.artifact_bytes
            )
        return cls(
            id=job.id,
            status=job.status,
            model=job.model,
            recipe=job.recipe,
            request=job.request,
            progress=JobProgress(
                stage=job.progress_stage,
                current=job.progress_current,
                total=job.progress_total,
                percent=job.progress_percent,
                message=job.progress_message,
            ),
            error=job.error,
            cancel_requested=job.cancel_requested,
            attempts=job.attempts,
            artifact=artifact,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            heartbeat_at=job.heartbeat_at,
        )


class JobPage(BaseModel):
    items: list[JobOut]
    total: int = Field(description="jobs matching the filter, over all pages")
    limit: int
    offset: int


class Preset(BaseModel):
    name: str
    description: str
    recipe: dict[str, Any]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
