"""A job's log, kept in the database so that a job page opened at any time, or an API client,
reads the whole story of the job.

What is written is what a person wants to read afterwards, not what the progress bar
already shows: a line when a run starts (and which attempt it is), one per pipeline stage as
it starts, each note the pipeline reports (storing an artifact), a cancel request, a retry
after a lost worker, and how the job ended (success with its artifacts, the failure's
reason, cancellation). The throttled per-layer progress updates are not logged: they are
the job row's `progress`, hundreds per job, and would bury the few lines that explain it.

Each line is written in the transaction of the state change it describes (so a reader never
sees a finished job without the line that says how it finished, and a run that lost its job
writes nothing), inside a savepoint: a line that cannot be written is given up, and the
state change goes on. Past `job_log_max_lines` lines of one job (a pipeline noting in a
loop) the oldest are removed, so one job cannot fill the database.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.models import JobLog, LogLevel

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 2000


def append(
    session: Session,
    job_id: str,
    message: str,
    level: LogLevel = LogLevel.INFO,
    stage: str | None = None,
    attempt: int | None = None,
    max_lines: int | None = None,
) -> bool:
    """Add a line to the session's transaction (the caller commits); False if it could not."""
    max_lines = max_lines or get_settings().job_log_max_lines
    try:
        with session.begin_nested():
            session.add(JobLog(job_id=job_id, message=message[:MAX_MESSAGE_CHARS], level=level, stage=stage, attempt=attempt))
            session.flush()
            _trim(session, job_id, max_lines)
        return True
    except SQLAlchemyError:
        log.exception("job %s: could not write the log line %r", job_id, message[:200])
        return False


def _trim(session: Session, job_id: str, max_lines: int) -> None:
    """Remove the oldest lines past the newest `max_lines`."""
    newest_removed = session.scalar(
        select(JobLog.id).where(JobLog.job_id == job_id).order_by(JobLog.id.desc()).offset(max_lines).limit(1)
    )
    if newest_removed is not None:
        session.execute(delete(JobLog).where(JobLog.job_id == job_id, JobLog.id <= newest_removed))


def read(session: Session, job_id: str, after: int = 0, limit: int | None = 100) -> list[JobLog]:
    """The job's lines after the line `after` (0: from the first kept), oldest first; at most
    `limit` (None: all, at most job_log_max_lines)."""
    query = select(JobLog).where(JobLog.job_id == job_id, JobLog.id > after).order_by(JobLog.id).limit(limit)
    return list(session.scalars(query))
