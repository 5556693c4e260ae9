"""The Celery task: run one quantization job, and record its outcome in the database.

All quantization is quantcore's (`run_job`); this module only moves the job through its
states, keeps its files in order and turns exceptions into readable reasons.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

from app import logctx
from app.artifact_store import ArtifactStoreError, store_for
from app.core.config import Settings, get_settings
from worker import state
from worker.celery_app import RUN_JOB_TASK, celery_app

log = logging.getLogger(__name__)


@celery_app.task(name=RUN_JOB_TASK, bind=True, max_retries=None)
def run_quantization_job(self, job_id: str) -> None:
    """Idempotent: a job that is finished, or held by a live run elsewhere, is not run again."""
    with logctx.bound(job_id=job_id):  # every log line of this job's run carries its id
        settings = get_settings()
        try:
            claim = state.claim(job_id, settings)
        except state.DATABASE_DOWN as exc:
            # The message must outlive the outage: acknowledged now, the job would stay queued.
            log.warning("job %s: the database did not answer (%s); trying again in 5 s", job_id, exc)
            raise self.retry(countdown=5) from None
        if claim.action is state.Action.WAIT:
            # A redelivered message while the job's previous run may still be alive: look
            # again once its heartbeat could have lapsed.
            raise self.retry(countdown=settings.job_heartbeat_timeout)
        if claim.action is state.Action.RUN:
            execute(job_id, claim.attempt, claim.request or {}, settings)
        elif claim.abandoned:
            discard_files(settings, job_id)


def artifact_file(job_id: str, fmt: str, main: bool) -> str:
    """The artifact store's file name of a job's artifact: `<id>.tar` for its main (first)
    format, `<id>.<format>.tar` for each further one."""
    return f"{job_id}.tar" if main else f"{job_id}.{fmt}.tar"


def _archive_names(job_id: str) -> list[str]:
    """Every archive name the job may have in the store (the export formats a request can name)."""
    from quantcore.job import ExportFormat

    return sorted({artifact_file(job_id, fmt, main) for fmt in ExportFormat.__args__ for main in (True, False)})


def _discard_archives(settings: Settings, job_id: str) -> None:
    """What this or an earlier attempt of a job that did not succeed left in the store."""
    store = store_for(settings)
    for name in _archive_names(job_id):
        try:
            store.delete(name)
        except ArtifactStoreError:  # the job's outcome matters more; the file is unlisted anyway
            log.exception("job %s: could not remove %s from the artifact store", job_id, name)


def discard_files(settings: Settings, job_id: str) -> None:
    """What a lost run of a job that will not run again left: its work folder (on this
    machine) and any archive it stored before it died."""
    _discard_archives(settings, job_id)
    _remove(settings.work_dir / job_id)


def execute(job_id: str, attempt: int, request_data: dict, settings: Settings) -> None:
    work = settings.work_dir / job_id  # run_job's output_dir; the artifact folders go inside
    _remove(work)  # what an earlier, lost attempt left behind
    with logctx.bound(job_id=job_id, attempt=attempt):
        log.info("job %s: attempt %d starting", job_id, attempt)
        try:
            _run_and_record(job_id, attempt, request_data, settings, work)
        except state.LostClaim:
            # Another run took the job over (this one missed its heartbeats): that run owns the
            # outcome and these files now, so leave both alone.
            log.warning("job %s: attempt %d was taken over by another run; stopping", job_id, attempt)
            return
    _remove(work)


def _run_and_record(job_id: str, attempt: int, request_data: dict, settings: Settings, work: Path) -> None:
    import quantcore.job
    from quantcore.classic_job import JOB_SPEC, ClassicJobRequest, run_classic_job
    from quantcore.export import archive_artifact
    from quantcore.job import JobCancelled
    from worker.progress import ProgressReporter

    beat_s = min(10.0, settings.job_heartbeat_timeout / 4)
    progress = ProgressReporter(job_id, attempt, heartbeat_interval_s=beat_s)
    try:
        request = JOB_SPEC.validate_python(request_data)
        local = settings.allow_local_model_paths
        with progress:
            with progress.interruptible():  # not the store's upload: it must not stop halfway
                if isinstance(request, ClassicJobRequest):
                    locate = lambda what, ref: upload_folder(settings, what, ref)  # noqa: E731
                    report = run_classic_job(request, work, progress, allow_local_paths=local, locate=locate)
                else:
                    report = quantcore.job.run_job(request, work, progress, allow_local_paths=local,
                                                   locate=lambda ref: upload_folder(settings, "model", ref))
            # one archive per exported format; the report says which file, sha256 and size each is
            artifacts = report.setdefault("artifacts", [{"format": "qforge", "folder": "artifact"}])
            store = store_for(settings)
            for index, artifact in enumerate(artifacts):
                name = artifact_file(job_id, artifact["format"], main=index == 0)
                archive = work / "archives" / name
                artifact.update(file=name, **archive_artifact(work / artifact["folder"], archive))
                progress.note(f"storing {name} ({artifact['bytes']} bytes) in the artifact store")
                store.put(name, archive)  # whole or not at all; the heartbeat goes on meanwhile
        main = artifacts[0]
        state.succeed(job_id, attempt, report, main["file"], main["sha256"], main["bytes"])
        log.info("job %s: succeeded; artifacts %s", job_id, ", ".join(f"{a['file']} ({a['bytes']} bytes)" for a in artifacts))
    except state.LostClaim:
        raise
    except JobCancelled:
        _discard_archives(settings, job_id)
        state.cancel(job_id, attempt)
        log.info("job %s: cancelled", job_id)
    except Exception as exc:
        _discard_archives(settings, job_id)
        if progress.cancelled.is_set():  # the interruption surfaced as another error
            state.cancel(job_id, attempt)
            log.info("job %s: cancelled (%s)", job_id, failure_reason(exc))
            return
        state.fail(job_id, attempt, failure_reason(exc))
        log.warning("job %s: failed: %s", job_id, failure_reason(exc), exc_info=True)


def upload_folder(settings: Settings, what: str, ref: str) -> Path:
    """Where an upload's files are: `<data_dir>/models/<id>` or `<data_dir>/datasets/<id>`
    (the request was validated: the id is hex, it cannot leave the folder)."""
    folder = (settings.models_dir if what == "model" else settings.datasets_dir) / ref.removeprefix("upload:")
    if not folder.is_dir():
        raise FileNotFoundError(f"the {what} '{ref}' is no longer stored (was it deleted?)")
    return folder


# What running out of a resource looks like, as errno or as the text of libraries that
# wrap it (safetensors' Rust errors, torch's allocator).
OUT_OF_DISK = ({errno.ENOSPC, errno.EDQUOT}, ("No space left on device", "Disk quota exceeded", "StorageFull"))
OVER_FILE_LIMIT = ({errno.EFBIG}, ("File too large", "FileTooLarge"))
OUT_OF_MEMORY = ({errno.ENOMEM}, ("can't allocate memory", "Cannot allocate memory", "out of memory"))


def failure_reason(exc: BaseException) -> str:
    """What a user reads on a failed job: the exception's type and message, no traceback,
    after what ran out when the cause was the worker's disk or memory."""
    message = str(exc).strip()
    reason = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    if cause := _exhausted(exc):
        reason = f"{cause}: {reason}"
    return reason if len(reason) <= 2000 else reason[:1999] + "…"


def _exhausted(exc: BaseException) -> str | None:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 10:  # the exception and its causes
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    for cause, (errnos, texts) in (
        ("out of disk space on the worker", OUT_OF_DISK),
        ("a file grew past the worker's file-size limit (out of disk space or quota)", OVER_FILE_LIMIT),
        ("out of memory on the worker", OUT_OF_MEMORY),
    ):
        for e in seen:
            if getattr(e, "errno", None) in errnos or any(t in str(e) for t in texts):
                return cause
        if cause.startswith("out of memory") and any(isinstance(e, MemoryError) for e in seen):
            return cause
    return None


def _remove(folder: Path) -> None:
    """Delete a job's work folder (its archives are built inside it, `.partial` files too)."""
    shutil.rmtree(folder, ignore_errors=True)
