"""Database tables. One row per tenant and per API key (stored hashed); one row per job: its
request, state, progress, outcome and artifact, and its log lines; one per uploaded dataset and
per uploaded model, written once its file is complete and checked; one per webhook event of a
job that named a callback URL, with its delivery's state. Jobs, datasets and models each belong
to one tenant (reports and artifacts belong to their job), and the API only ever reads a
tenant's own rows."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON, BigInteger, Boolean, DateTime, Enum, Float, ForeignKey, Index, Integer, MetaData, String, Text, TypeDecorator,
    UniqueConstraint, text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps no zone: it is restored here)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime: store timezone-aware UTC times")
        return value.astimezone(dt.UTC) if value is not None else None

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class DatasetFormat(enum.StrEnum):
    NPZ = "npz"
    JSONL = "jsonl"


class DatasetKind(enum.StrEnum):
    ARRAYS = "arrays"  # x (and y): calibration, training or evaluation samples of a classifier
    TEXT = "text"  # {"text": ...} lines: text calibration data


class ModelFormat(enum.StrEnum):
    SAFETENSORS = "safetensors"  # one file with a config naming a classic architecture (classic jobs)
    HF_FOLDER = "hf-folder"  # a Hugging Face folder (config.json, *.safetensors, tokenizer), uploaded as an archive
    GGUF = "gguf"


class WebhookState(enum.StrEnum):
    PENDING = "pending"  # the job is still running, or its event is not delivered yet
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # given up: a 4xx answer, an address not allowed, or out of attempts


class Scope(enum.StrEnum):
    """What an API key may do; each scope includes the ones before it."""

    READ = "read"  # list and read the tenant's objects, download its artifacts
    SUBMIT = "submit"  # also submit and cancel jobs, upload and delete models and datasets
    ADMIN = "admin"  # also create and revoke the tenant's API keys

    def allows(self, needed: Scope) -> bool:
        return SCOPE_ORDER.index(self) >= SCOPE_ORDER.index(needed)


SCOPE_ORDER = (Scope.READ, Scope.SUBMIT, Scope.ADMIN)


class LogLevel(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"  # cancellation, a lost worker's retry
    ERROR = "error"  # why a job failed


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    """A string column holding one of an enum's values, with a CHECK constraint (as in the migrations)."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Base(DeclarativeBase):
    # Deterministic constraint names, matching the migrations on every backend.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "pk": "pk_%(table_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        }
    )


DEFAULT_TENANT = "default"  # created by the migration that added tenants; owns what existed before


class Tenant(Base):
    """Who owns jobs, uploads and keys. `id` is a short name chosen at creation (lowercase
    letters, digits, dashes): it appears in logs and in the admin CLI."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Quotas (app.quotas); None: the service's default (Settings.tenant_*)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)  # queued + running at once
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger)  # uploads + artifacts kept
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)  # API calls, all the tenant's keys together


class ApiKey(Base):
    """An API key, stored as the sha256 of the key: the key itself is shown once, when it is
    created. A hash without salt or stretching suffices because keys are 256-bit random
    strings, not passwords: no dictionary holds them. `prefix` (the key's first characters)
    lets a person tell their keys apart in listings."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[Scope] = mapped_column(_enum(Scope, "scope"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # joined: every call's key check also needs the tenant's limits, in the same query
    tenant: Mapped[Tenant] = relationship(lazy="joined")


# The jobs whose artifacts count against the tenant's storage (app/quotas.py)
STORED_ARTIFACTS = text("artifact_path IS NOT NULL AND artifacts_deleted_at IS NULL")
STORED_ARTIFACTS_COLUMNS = ("artifacts_total_bytes", "artifact_bytes", "artifact_path", "artifacts_deleted_at")


class Job(Base):
    __tablename__ = "jobs"
    # an Idempotency-Key is the client's: the same key from two tenants names two jobs
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        # Every submission counts the tenant's active jobs and sums its stored artifacts
        # (app/quotas.py). Through the tenant index alone both read every job the tenant ever
        # ran, a cost that grows with its history; these read only the active jobs and the
        # jobs still holding artifacts.
        Index("ix_jobs_tenant_status", "tenant_id", "status"),
        # Every column the storage sum reads is in it, so the sum reads the index alone; and
        # SQLite, with no statistics to go by, picks it over the listing's index below (which
        # would read every job of the tenant) only when it covers more.
        Index("ix_jobs_tenant_stored_artifacts", "tenant_id", *STORED_ARTIFACTS_COLUMNS,
              sqlite_where=STORED_ARTIFACTS, postgresql_where=STORED_ARTIFACTS),
        # The listing's page, newest first, read in order rather than sorted from the tenant's
        # whole history (it also serves every lookup by tenant alone).
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"), default=JobStatus.QUEUED, index=True)
    model: Mapped[str] = mapped_column(String(1024))
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)  # the parsed recipe, exactly as run
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # the whole validated JobRequest

    progress_stage: Mapped[str | None] = mapped_column(String(32))
    progress_current: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    progress_percent: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str] = mapped_column(Text, default="")

    error: Mapped[str | None] = mapped_column(Text)  # human-readable reason of a failure
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    artifact_path: Mapped[str | None] = mapped_column(String(1024))  # relative to Settings.artifact_dir
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    artifact_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # every exported format's archive together (what the tenant's storage quota counts)
    artifacts_total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Set when the job's artifacts were removed from the store (the row and report stay).
    artifacts_deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    artifacts_deleted_reason: Mapped[str | None] = mapped_column(String(32))  # "request" or "retention"

    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    callback_url: Mapped[str | None] = mapped_column(String(2048))  # POSTed a signed event when the job finishes
    # joined: shown with every job the API returns, read in the job's own query (a job has at
    # most one, so the join never multiplies rows; selectin cost a second query per poll)
    webhook: Mapped[WebhookDelivery | None] = relationship(
        lazy="joined", uselist=False, cascade="all, delete-orphan", passive_deletes=True
    )


class WebhookDelivery(Base):
    """The event a job with a callback URL sends when it finishes, and its delivery. The row
    is written with the job (so no finished job's event can be missed); the worker that
    first sends it fixes the event's type and body, and every retry sends those same bytes."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)  # the event id
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    state: Mapped[WebhookState] = mapped_column(_enum(WebhookState, "webhook_state"), default=WebhookState.PENDING, index=True)
    event_type: Mapped[str | None] = mapped_column(String(32))  # job.succeeded, job.failed, job.cancelled
    body: Mapped[str | None] = mapped_column(Text)  # the JSON sent, exactly
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # when the next attempt is due; while an attempt runs, the end of its lease (a worker that
    # dies mid-attempt leaves the event due again once the lease ends)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)  # the receiver's HTTP status
    last_error: Mapped[str | None] = mapped_column(Text)  # why the last attempt did not deliver
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobLog(Base):
    """One line of a job's log (what is written, and why, is in app/joblog.py). `id` orders
    the lines of a job; a reader passes the last one it has to get the next."""

    __tablename__ = "job_log"
    # a job's lines in order: the only way they are read
    __table_args__ = (Index("ix_job_log_job_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[LogLevel] = mapped_column(_enum(LogLevel, "log_level"), default=LogLevel.INFO)
    stage: Mapped[str | None] = mapped_column(String(32))  # the pipeline's stage when written, if running
    message: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int | None] = mapped_column(Integer)  # the worker's run; None for the API's lines


class Dataset(Base):
    """An uploaded dataset; its file is `path` under Settings.data_dir."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[DatasetFormat] = mapped_column(_enum(DatasetFormat, "dataset_format"))
    kind: Mapped[DatasetKind] = mapped_column(_enum(DatasetKind, "dataset_kind"))
    samples: Mapped[int] = mapped_column(Integer)
    x_shape: Mapped[list[int] | None] = mapped_column(JSON)  # one sample's shape; None for text
    has_labels: Mapped[bool] = mapped_column(Boolean)
    classes: Mapped[int | None] = mapped_column(Integer)  # distinct labels; None without labels
    path: Mapped[str] = mapped_column(String(1024))  # relative to Settings.data_dir
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class UploadedModel(Base):
    """An uploaded checkpoint in a format that cannot run code when loaded, with the
    architecture (and its arguments) that the worker builds before loading the weights."""

    __tablename__ = "uploaded_models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[ModelFormat] = mapped_column(_enum(ModelFormat, "model_format"))
    architecture: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # as uploaded, "architecture" included
    tensors: Mapped[int] = mapped_column(Integer)
    parameters: Mapped[int] = mapped_column(BigInteger)  # elements over all tensors (buffers too)
    path: Mapped[str] = mapped_column(String(1024))  # relative to Settings.data_dir
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
