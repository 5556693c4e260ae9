"""A job's state transitions on the worker side, each one a single conditional UPDATE.

A run owns a job through its attempt number: `claim` increments `attempts`, and every later
write of that run is conditioned on it (a fencing token). If a run's worker is presumed lost
and another run takes the job over, the old run's writes match no row and it stops, so two
runs never both record an outcome.

The job's log lines (app/joblog.py) are written here, in the transaction of the change they
describe and only when that change matched the row: a run that lost its job logs nothing.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from app import joblog
from app.core.config import Settings
from app.core.db import session_scope
from app.models import TERMINAL, Job, JobStatus, LogLevel, utcnow

log = logging.getLogger(__name__)

DATABASE_DOWN = (OperationalError, InterfaceError)  # what a database restart raises
OUTCOME_RETRY_S = 300  # how long a finished run keeps trying to record its outcome


class LostClaim(Exception):
    """This run no longer owns its job (it was taken over after a missed heartbeat)."""


class Action(enum.Enum):
    RUN = "run"  # this task now owns the job
    SKIP = "skip"  # nothing to do: finished, cancelled, unknown, or just given up on
    WAIT = "wait"  # another live run holds the job; look again once its heartbeat could lapse


@dataclass(frozen=True)
class Claim:
    action: Action
    attempt: int = 0
    request: dict[str, Any] | None = None
    abandoned: bool = False  # this claim just gave the job up: its lost run's files are left over


def _owned(job_id: str, attempt: int):
    return (Job.id == job_id, Job.attempts == attempt, Job.status == JobStatus.RUNNING)


def worker_lost_reason(job: Job) -> str:
    since = f"since {job.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC" if job.heartbeat_at else "at all"
    return (
        f"the worker running attempt {job.attempts} stopped responding (no heartbeat {since}); "
        f"gave up after {job.attempts} attempt{'s' if job.attempts != 1 else ''}"
    )


def claim(job_id: str, settings: Settings) -> Claim:
    now = utcnow()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %s: no such job, message dropped", job_id)
            return Claim(Action.SKIP)
        if job.status in TERMINAL:
            return Claim(Action.SKIP)
        if job.status == JobStatus.RUNNING:
            if not _heartbeat_lapsed(job, now, settings):
                return Claim(Action.WAIT)
            if not may_retry(job, settings):
                return Claim(Action.SKIP, abandoned=_finish_abandoned(session, job, settings, now))
        attempts = job.attempts  # read before the UPDATE, which refreshes the loaded row
        unchanged = [Job.id == job_id, Job.status == job.status, Job.attempts == attempts]
        if job.status == JobStatus.RUNNING:
            unchanged.append(_lapsed(settings, now))
        taken = session.execute(
            update(Job)
            .where(*unchanged)
            .values(
                status=JobStatus.RUNNING,
                attempts=attempts + 1,
                started_at=job.started_at or now,
                heartbeat_at=now,
                progress_stage=None,
                progress_current=0,
                progress_total=0,
                progress_percent=0.0,
                progress_message="started" if attempts == 0 else f"restarted (attempt {attempts + 1})",
            )
        ).rowcount
        if taken != 1:
            # Changed between our read and our write: cancelled, or claimed by another worker.
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            return Claim(Action.SKIP if status in TERMINAL else Action.WAIT)
        started = "started" if attempts == 0 else f"restarted: attempt {attempts + 1} of {settings.max_job_attempts}"
        joblog.append(session, job_id, started, attempt=attempts + 1)
        return Claim(Action.RUN, attempts + 1, job.request)


def _cutoff(settings: Settings, now: dt.datetime) -> dt.datetime:
    return now - dt.timedelta(seconds=settings.job_heartbeat_timeout)


def _heartbeat_lapsed(job: Job, now: dt.datetime, settings: Settings) -> bool:
    return job.heartbeat_at is None or job.heartbeat_at < _cutoff(settings, now)


def _lapsed(settings: Settings, now: dt.datetime):
    """SQL condition: still no heartbeat since the cutoff (re-checked in the UPDATE itself)."""
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < _cutoff(settings, now))


def _finish_abandoned(session, job: Job, settings: Settings, now: dt.datetime) -> bool:
    """End a running job whose worker was lost and which must not run again; False when the
    row changed meanwhile (another worker ended it first)."""
    if job.cancel_requested:
        values = {"status": JobStatus.CANCELLED, "progress_message": "cancelled (its worker was lost)"}
        line = (LogLevel.WARNING, "cancelled (its worker was lost)")
    else:
        values = {"status": JobStatus.FAILED, "error": worker_lost_reason(job)}
        line = (LogLevel.ERROR, f"failed: {worker_lost_reason(job)}")
    written = session.execute(
        update(Job)
        .where(*_owned(job.id, job.attempts), _lapsed(settings, now))
        .values(finished_at=now, **values)
    ).rowcount
    if written == 1:
        joblog.append(session, job.id, line[1], line[0], stage=job.progress_stage, attempt=job.attempts)
    return written == 1


def record_progress(
    job_id: str, attempt: int, stage: str, current: int, total: int, percent: float, message: str,
    log_line: str | None = None,
) -> bool:
    """Write progress and a heartbeat (and `log_line` to the job's log); returns whether
    cancellation was requested."""
    with session_scope() as session:
        written = session.execute(
            update(Job)
            .where(*_owned(job_id, attempt))
            .values(
                progress_stage=stage,
                progress_current=current,
                progress_total=total,
                progress_percent=percent,
                progress_message=message[:2000],
                heartbeat_at=utcnow(),
            )
        ).rowcount
        if written != 1:
            raise LostClaim(f"job {job_id}: attempt {attempt} no longer owns the job")
        if log_line:
            joblog.append(session, job_id, log_line, stage=stage, attempt=attempt)
        return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def cancel_requested(job_id: str) -> bool:
    with session_scope() as session:
        return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def heartbeat(job_id: str, attempt: int) -> bool:
    """Returns False when this run no longer owns the job."""
    with session_scope() as session:
        return session.execute(update(Job).where(*_owned(job_id, attempt)).values(heartbeat_at=utcnow())).rowcount == 1


def _finish(job_id: str, attempt: int, status: JobStatus, line: tuple[LogLevel, str], **values: Any) -> None:
    """Record a run's outcome; through a database outage it tries again every 2 s for up to
    OUTCOME_RETRY_S (if the job is taken over meanwhile, the write matches no row)."""
    deadline = time.monotonic() + OUTCOME_RETRY_S
    while True:
        try:
            with session_scope() as session:
                written = session.execute(
                    update(Job).where(*_owned(job_id, attempt)).values(status=status, finished_at=utcnow(), **values)
                ).rowcount
                if written == 1:
                    stage = session.scalar(select(Job.progress_stage).where(Job.id == job_id))
                    joblog.append(session, job_id, line[1], line[0], stage=stage, attempt=attempt)
            break
        except DATABASE_DOWN as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("job %s: outcome not recorded, the database did not answer (%s); trying again", job_id, exc)
            time.sleep(2.0)
    if written != 1:
        raise LostClaim(f"job {job_id}: attempt {attempt} no longer owns the job; its outcome is not recorded")


def succeed(job_id: str, attempt: int, report: dict, artifact_path: str, sha256: str, size: int) -> None:
    stored = ", ".join(f"{a['file']} ({a['bytes']} bytes)" for a in report.get("artifacts", []) if "file" in a)
    _finish(
        job_id, attempt, JobStatus.SUCCEEDED, (LogLevel.INFO, f"succeeded; artifacts: {stored or artifact_path}"),
        report=report, artifact_path=artifact_path, artifact_sha256=sha256,
        artifact_bytes=size, progress_percent=100.0, progress_message="done",
        artifacts_total_bytes=sum(a.get("bytes", 0) for a in report.get("artifacts", [])) or size,
        # the last progress call may have been throttled away: a finished job shows N of N
        progress_current=Job.progress_total,
    )


def fail(job_id: str, attempt: int, reason: str) -> None:
    _finish(job_id, attempt, JobStatus.FAILED, (LogLevel.ERROR, f"failed: {reason}"), error=reason)


def cancel(job_id: str, attempt: int) -> None:
    _finish(job_id, attempt, JobStatus.CANCELLED, (LogLevel.WARNING, "cancelled on request"), progress_message="cancelled")


def lost_jobs(settings: Settings) -> list[Job]:
    """Running jobs whose heartbeat lapsed: their worker died or lost its database."""
    with session_scope() as session:
        return list(session.scalars(select(Job).where(Job.status == JobStatus.RUNNING, _lapsed(settings, utcnow()))))


def queued_job_ids() -> list[str]:
    """Queued jobs, oldest first (the order their messages were first sent)."""
    with session_scope() as session:
        return list(session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED).order_by(Job.created_at)))


def may_retry(job: Job, settings: Settings) -> bool:
    return not job.cancel_requested and job.attempts < settings.max_job_attempts


def mark_requeued(job: Job, settings: Settings) -> None:
    with session_scope() as session:
        written = session.execute(
            update(Job)
            .where(*_owned(job.id, job.attempts), _lapsed(settings, utcnow()))
            .values(status=JobStatus.QUEUED, progress_message="requeued: its worker was lost")
        ).rowcount
        if written == 1:
            since = f"since {job.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC" if job.heartbeat_at else "at all"
            message = f"the worker running attempt {job.attempts} stopped responding (no heartbeat {since}); requeued"
            joblog.append(session, job.id, message, LogLevel.WARNING, stage=job.progress_stage, attempt=job.attempts)


def abandon(job: Job, settings: Settings) -> bool:
    with session_scope() as session:
        return _finish_abandoned(session, job, settings, utcnow())
