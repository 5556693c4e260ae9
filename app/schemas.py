"""What the API returns. A job is shown with its progress and, once archived, its artifact;
an uploaded dataset or model with what its checks found in the file."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, Field

from app.core.config import Settings, get_settings
from app.models import (
    Dataset, DatasetFormat, DatasetKind, Job, JobLog, JobStatus, LogLevel, ModelFormat, Scope, UploadedModel, WebhookState,
)


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
    format: str | None = Field(None, description="qforge, compressed-tensors, ...")


class WebhookInfo(BaseModel):
    event_id: str = Field(validation_alias="id", description="the event's id, as in its X-Qforge-Event-Id header")
    state: WebhookState = Field(description="pending until the job finished and a receiver took the event; then delivered or failed")
    attempts: int
    last_status: int | None = Field(None, description="the receiver's HTTP status at the last attempt")
    last_error: str | None = Field(None, description="why the last attempt did not deliver")
    last_attempt_at: dt.datetime | None
    next_attempt_at: dt.datetime | None
    delivered_at: dt.datetime | None


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
    artifact: ArtifactInfo | None = Field(None, description="the main artifact: the first export format")
    artifacts: list[ArtifactInfo] = Field(default_factory=list, description="one per export format, the main one first")
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    updated_at: dt.datetime
    heartbeat_at: dt.datetime | None
    artifacts_expire_at: dt.datetime | None = Field(
        None, description="when the retention setting deletes the artifacts; null: kept until deleted"
    )
    artifacts_deleted_at: dt.datetime | None = Field(None, description="when the artifacts were deleted from the store")
    artifacts_deleted_reason: str | None = Field(None, description="request (DELETE) or retention")
    callback_url: str | None = None
    webhook: WebhookInfo | None = Field(None, description="the delivery of the job's event to its callback_url")

    @classmethod
    def from_row(cls, job: Job, settings: Settings | None = None) -> JobOut:
        from app.artifacts import expires_at, job_artifacts

        stored = job_artifacts(job)
        artifacts = [
            ArtifactInfo(url=f"/v1/jobs/{job.id}/artifact" + (f"?format={a.format}" if a.format else ""),
                         sha256=a.sha256, bytes=a.bytes, format=a.format)
            for a in stored
        ]
        if stored:  # the main one's plain url (no ?format=)
            artifact = artifacts[0].model_copy(update={"url": f"/v1/jobs/{job.id}/artifact"})
        else:
            artifact = None
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
            artifacts=artifacts,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            heartbeat_at=job.heartbeat_at,
            artifacts_expire_at=expires_at(job, settings or get_settings()),
            artifacts_deleted_at=job.artifacts_deleted_at,
            artifacts_deleted_reason=job.artifacts_deleted_reason,
            callback_url=job.callback_url,
            webhook=WebhookInfo.model_validate(job.webhook, from_attributes=True) if job.webhook else None,
        )


class ArtifactLinkRequest(BaseModel):
    format: str | None = Field(None, description="an exported format (the report's `artifacts`); default: the main one")
    expires_in: int = Field(3600, ge=1, description="seconds the link works; at most the service's artifact_link_max_seconds")


class ArtifactLink(BaseModel):
    url: str = Field(description="downloads the artifact with no credentials until it expires")
    expires_at: dt.datetime
    format: str | None
    sha256: str
    bytes: int


class JobPage(BaseModel):
    items: list[JobOut]
    total: int = Field(description="jobs matching the filter, over all pages")
    limit: int
    offset: int


class JobLogLine(BaseModel):
    seq: int = Field(description="orders the job's lines; pass the last one read as `after` for the next")
    at: dt.datetime
    level: LogLevel
    stage: str | None = Field(None, description="the pipeline's stage when written")
    message: str
    attempt: int | None = Field(None, description="the worker's run that wrote it; null for the API's lines")

    @classmethod
    def from_row(cls, line: JobLog) -> JobLogLine:
        return cls(seq=line.id, at=line.created_at, level=line.level, stage=line.stage, message=line.message,
                   attempt=line.attempt)


class JobLogPage(BaseModel):
    items: list[JobLogLine] = Field(description="oldest first")
    next_after: int = Field(description="`after` for the next page: the last line's seq (the request's `after` when empty)")


class DatasetOut(BaseModel):
    id: str
    name: str
    format: DatasetFormat = Field(description="found from the file's content: npz or jsonl")
    kind: DatasetKind = Field(description="arrays (x, optional labels y) or text")
    samples: int
    x_shape: list[int] | None = Field(description="the shape of one sample's x; null for text")
    has_labels: bool
    classes: int | None = Field(description="distinct labels in y; null without labels")
    bytes: int
    sha256: str
    created_at: dt.datetime

    @classmethod
    def from_row(cls, dataset: Dataset) -> DatasetOut:
        return cls.model_validate(dataset, from_attributes=True)


class DatasetPage(BaseModel):
    items: list[DatasetOut]
    total: int = Field(description="datasets over all pages")
    limit: int
    offset: int


class ModelOut(BaseModel):
    id: str
    name: str
    format: ModelFormat
    architecture: str = Field(description="the model class the worker builds before loading the weights")
    config: dict[str, Any] = Field(description="as uploaded: the architecture and its arguments")
    tensors: int
    parameters: int = Field(description="elements over all tensors, buffers (e.g. BatchNorm statistics) included")
    bytes: int
    sha256: str
    created_at: dt.datetime

    @classmethod
    def from_row(cls, model: UploadedModel) -> ModelOut:
        return cls.model_validate(model, from_attributes=True)


class ModelPage(BaseModel):
    items: list[ModelOut]
    total: int = Field(description="uploaded models over all pages")
    limit: int
    offset: int


class Preset(BaseModel):
    name: str
    description: str
    recipe: dict[str, Any]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class ApiKeyOut(BaseModel):
    id: str
    tenant: str = Field(validation_alias="tenant_id")
    name: str
    prefix: str = Field(description="the key's first characters, to tell keys apart; the key itself is never shown again")
    scope: Scope = Field(description="read < submit < admin; each includes the ones before")
    created_at: dt.datetime
    last_used_at: dt.datetime | None = Field(None, description="to the minute")
    revoked_at: dt.datetime | None = None

    model_config = {"from_attributes": True, "populate_by_name": True}


class NewApiKey(ApiKeyOut):
    key: str = Field(description="the API key: shown in this answer only, store it now")


class ApiKeyRequest(BaseModel):
    model_config = {"extra": "forbid"}

    # no control characters: PostgreSQL text cannot hold NUL, and a listing shows the name
    name: str = Field("", max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$", description="what the key is for, shown in listings")
    scope: Scope = Scope.READ


class Identity(BaseModel):
    tenant: str
    key_id: str
    scope: Scope
    limits: dict[str, int] = Field(description="max_active_jobs, max_stored_bytes, requests_per_minute (0: none)")
    usage: dict[str, int] = Field(description="active_jobs (queued or running), stored_bytes (uploads and artifacts)")
