"""Submitting and cancelling jobs: the steps a route takes, in the order that keeps the
database and the broker consistent."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from app import crud, logctx, queue, quotas, webhooks
from app.core.config import Settings
from app.errors import Problem, validation_problem
from app.models import Dataset, DatasetKind, Job, JobStatus, ModelFormat, UploadedModel
from quantcore.classic_job import ClassicJobRequest
from quantcore.job import JobRequest
from quantcore.models.refs import UPLOAD

log = logging.getLogger(__name__)


def check_classic(session: Session, request: ClassicJobRequest, settings: Settings, tenant_id: str) -> None:
    """A classic job's model and data must be bundled or uploaded here by the same tenant (or,
    where the service allows local paths, paths): an unknown one is the client's error, found
    now. Another tenant's upload is unknown: the worker, which could read it, never gets its id."""
    from quantcore.models.classifiers import BUNDLED_CLASSIFIERS, BUNDLED_DATA

    refs = [("model", request.model, UploadedModel, BUNDLED_CLASSIFIERS), ("data.train", request.data.train, Dataset, BUNDLED_DATA)]
    if request.data.evaluation is not None:
        refs.append(("data.evaluation", request.data.evaluation, Dataset, BUNDLED_DATA))
    for field, ref, table, bundled in refs:
        what = "model" if table is UploadedModel else "dataset"
        if ref.startswith("upload:"):
            row = crud.get_upload(session, table, ref.removeprefix("upload:"), tenant_id)
            if row is None:
                message = f"no uploaded {what} '{ref}': upload it with POST /v1/{what}s first"
            elif isinstance(row, Dataset) and row.kind != DatasetKind.ARRAYS:
                message = f"'{ref}' is a text dataset; classic jobs train and calibrate on arrays (x, y)"
            elif isinstance(row, UploadedModel) and row.format != ModelFormat.SAFETENSORS:
                message = (f"'{ref}' is a {row.format.value} upload ({row.architecture}); classic jobs take a "
                           "safetensors file with a classic architecture; submit it as a recipe job")
            else:
                continue
        elif ref in bundled:
            continue
        elif not ref.startswith("bundled:") and settings.allow_local_model_paths:
            continue
        else:
            message = f"'{ref}': name an upload ('upload:<id>') or bundled {what} ({', '.join(bundled)})"
        error = {"loc": ["body", *field.split(".")], "msg": message, "type": f"unknown_{what}"}
        raise validation_problem([error], slug=f"unknown-{what}", title=f"Unknown {what}")


def check_model(session: Session, request: JobRequest, settings: Settings, tenant_id: str) -> None:
    """An unknown model is the client's error, found now rather than by a failed job. An
    upload must be the same tenant's: another tenant's is unknown."""
    from quantcore.models import ModelNotFoundError, resolve_model_ref

    ref = request.model.strip()
    if ref.startswith("upload:"):
        if not UPLOAD.match(ref):
            message = f"'{ref[:100]}': an upload is named 'upload:<id>', the id POST /v1/models returned"
        elif (row := crud.get_upload(session, UploadedModel, ref.removeprefix("upload:"), tenant_id)) is None:
            message = f"no uploaded model '{ref}': upload it with POST /v1/models first"
        elif row.format == ModelFormat.SAFETENSORS:
            message = (f"'{ref}' is a classic model ({row.architecture}); recipe jobs take a Hugging Face folder or "
                       'GGUF upload; submit it as a classic job ({"kind": "ptq", ...})')
        else:
            return
        error = {"loc": ["body", "model"], "msg": message, "type": "unknown_model"}
        raise validation_problem([error], slug="unknown-model", title="Unknown model")
    try:
        resolve_model_ref(request.model, allow_local_paths=settings.allow_local_model_paths)
    except ModelNotFoundError as exc:
        error = {"loc": ["body", "model"], "msg": str(exc), "type": "unknown_model"}
        raise validation_problem([error], slug="unknown-model", title="Unknown model") from None
    except ValueError as exc:
        raise validation_problem([{"loc": ["body", "model"], "msg": str(exc), "type": "value_error"}]) from None


def submit(
    session: Session,
    request: JobRequest | ClassicJobRequest,
    idempotency_key: str | None,
    settings: Settings,
    tenant_id: str,
) -> tuple[Job, bool]:
    """Validate the model (and data), store the tenant's job, then enqueue it; returns (job, created)."""
    if isinstance(request, ClassicJobRequest):
        check_classic(session, request, settings, tenant_id)
    else:
        check_model(session, request, settings, tenant_id)
    callback_url = getattr(request, "callback_url", None)
    if callback_url is not None:
        webhooks.check_callback(callback_url, settings)
    if not (idempotency_key and crud.find_by_idempotency_key(session, idempotency_key, tenant_id)):
        quotas.check_submission(session, tenant_id, settings)  # a replay is not a new job: never refused
    job, created = crud.create_job(session, request, idempotency_key, callback_url, tenant_id=tenant_id)
    logctx.bind(job_id=job.id)  # the request's log lines from here on, its own included
    if not created:
        if (job.request, job.callback_url) != (webhooks.request_data(request), callback_url):
            raise Problem(
                422,
                "idempotency-key-reused",
                "Idempotency key reused",
                f"Idempotency-Key '{idempotency_key}' was used for a different request (job {job.id})",
                job_id=job.id,
            )
        return job, False
    # Only now, with the row committed: a worker must never receive an id it cannot find.
    try:
        queue.enqueue(job.id)
    except Exception as exc:
        reason = f"could not queue the job: {type(exc).__name__}: {exc}"
        log.error("job %s: %s", job.id, reason)
        crud.fail_job(session, job, reason)
        raise Problem(503, "broker-unavailable", "Job queue unavailable", reason, job_id=job.id) from None
    return job, True


def cancel(session: Session, job: Job) -> tuple[Job, bool]:
    """Returns the job and whether it was running (its worker stops at its next progress
    report; by the time of the answer it may already have). Cancelling a cancelled job
    answers the job again: a client retrying a cancel whose answer it lost gets what it
    asked for, not an error; a job that succeeded or failed cannot be cancelled (409)."""
    outcome = crud.request_cancel(session, job.id)
    session.refresh(job)
    if outcome is None and job.status == JobStatus.CANCELLED:
        return job, False
    if outcome is None:
        detail = f"job {job.id} is already {job.status.value}; nothing to cancel"
        raise Problem(409, "job-finished", "Job already finished", detail)
    return job, outcome == "requested"


def require_status(job: Job, wanted: JobStatus, what: str) -> None:
    if job.status != wanted:
        raise Problem(
            409,
            "job-not-finished" if not job.status.terminal else "job-not-succeeded",
            f"No {what} yet" if not job.status.terminal else f"No {what}",
            f"job {job.id} is {job.status.value}; its {what} exists once it has succeeded"
            + (f" (it failed: {job.error})" if job.status == JobStatus.FAILED and job.error else ""),
            job_status=job.status.value,
        )
