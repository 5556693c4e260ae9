"""Job rows as the API reads and writes them (the worker's transitions are in worker/state.py),
and the rows of uploaded datasets and models. Every read takes the caller's tenant: a row of
another tenant is never returned (the worker, which runs any tenant's job, reads by id in
worker/state.py)."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import joblog
from app.models import (
    TERMINAL, Dataset, Job, JobStatus, LogLevel, UploadedModel, WebhookDelivery, WebhookState, utcnow,
)
from quantcore.classic_job import ClassicJobRequest
from quantcore.job import JobRequest

Upload = TypeVar("Upload", Dataset, UploadedModel)


# built once: a pipeline polls its job over and over, and building the statement cost more than running it
_TENANT_JOB = select(Job).where(Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"))


def get_job(session: Session, job_id: str, tenant_id: str) -> Job | None:
    return session.scalar(_TENANT_JOB, {"job_id": job_id, "tenant_id": tenant_id})


def find_by_idempotency_key(session: Session, key: str, tenant_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key))


def create_job(
    session: Session,
    request: JobRequest | ClassicJobRequest,
    idempotency_key: str | None,
    callback_url: str | None = None,
    *,
    tenant_id: str,
) -> tuple[Job, bool]:
    """Insert a queued job and commit; returns (job, created). With a key already used, the
    existing job is returned instead (also when two submissions race to insert it). A job
    with a callback URL gets its webhook row in the same commit: whichever process later
    finishes the job, the worker's dispatcher finds the event due."""
    if idempotency_key and (existing := find_by_idempotency_key(session, idempotency_key, tenant_id)):
        return existing, False
    job = Job(
        tenant_id=tenant_id,
        status=JobStatus.QUEUED,
        model=request.model,
        recipe=request.spec() if isinstance(request, ClassicJobRequest) else request.recipe.model_dump(mode="json"),
        request=request.model_dump(mode="json", exclude={"callback_url"}),  # the callback is the service's, not quantcore's
        idempotency_key=idempotency_key,
        callback_url=callback_url,
        progress_current=0,
        progress_total=0,
        progress_percent=0.0,
        progress_message="queued",
        cancel_requested=False,
        attempts=0,
    )
    # None set, not left unloaded: the answer reads it, and an unloaded one is a query
    job.webhook = WebhookDelivery(state=WebhookState.PENDING, attempts=0) if callback_url is not None else None
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = find_by_idempotency_key(session, idempotency_key, tenant_id) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    return job, True


def list_jobs(
    session: Session, tenant_id: str, status: JobStatus | None, limit: int, offset: int, model_contains: str | None = None
) -> tuple[list[Job], int]:
    """The tenant's jobs, newest first; also the number matching over all pages.
    `model_contains` keeps the jobs whose model reference holds that text (any case)."""
    if model_contains and "\x00" in model_contains:
        return [], 0  # no model reference holds NUL (and PostgreSQL refuses it in a query)
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Job.status == status)
    if model_contains:
        query = query.where(Job.model.icontains(model_contains, autoescape=True))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    jobs = session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset))
    return list(jobs), total


def request_cancel(session: Session, job_id: str) -> str | None:
    """Cancel a queued job at once ("cancelled"), or flag a running one for its worker
    ("requested"); None when the job had already finished. Each is one conditional UPDATE, so
    a worker claiming the job at the same moment cannot be missed."""
    now = utcnow()
    queued = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.CANCELLED,
            cancel_requested=True,
            finished_at=now,
            progress_message="cancelled before it started",
        )
    ).rowcount
    running = not queued and session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True, progress_message="cancellation requested")
    ).rowcount
    changed = queued or running
    if queued:
        joblog.append(session, job_id, "cancelled before it started", LogLevel.WARNING)
    elif running:
        joblog.append(session, job_id, "cancellation requested; a running job stops within about a second", LogLevel.WARNING)
    session.commit()
    if not changed:
        return None
    return "cancelled" if queued else "requested"


def fail_job(session: Session, job: Job, reason: str) -> None:
    """Fail a job that never reached a worker (e.g. the broker refused its message). Its
    idempotency key is released: the client's retry with that key, once the broker is back,
    must queue the job, not replay this failure."""
    failed = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.not_in(TERMINAL))
        .values(status=JobStatus.FAILED, error=reason, finished_at=utcnow(), idempotency_key=None)
    ).rowcount
    if failed:
        joblog.append(session, job.id, f"failed: {reason}", LogLevel.ERROR)
    session.commit()
    session.refresh(job)


def get_upload(session: Session, table: type[Upload], upload_id: str, tenant_id: str) -> Upload | None:
    return session.scalar(select(table).where(table.id == upload_id, table.tenant_id == tenant_id))


def list_uploads(session: Session, table: type[Upload], tenant_id: str, limit: int, offset: int) -> tuple[list[Upload], int]:
    """The tenant's uploads, newest first; also the number of rows over all pages."""
    total = session.scalar(select(func.count()).select_from(table).where(table.tenant_id == tenant_id)) or 0
    query = select(table).where(table.tenant_id == tenant_id)
    rows = session.scalars(query.order_by(table.created_at.desc(), table.id.desc()).limit(limit).offset(offset))
    return list(rows), total


def add_upload(session: Session, row: Upload) -> Upload:
    session.add(row)
    session.commit()
    return row


def delete_upload(session: Session, row: Dataset | UploadedModel) -> None:
    session.delete(row)
    session.commit()
