"""The event stream of one job, for `GET /v1/jobs/{id}/events`.

The worker is another process and the database is the only place a job's state lives, so
the stream polls the job row and sends what changed. Polling twice a second costs one
primary-key read per follower, and needs no message bus beside the database. The job's new
log lines are read in the same transaction, and sent before the job's state: the line that
says how a job ended is committed with its end, so it comes before the stream's last event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from anyio import to_thread

from app import joblog
from app.core.db import session_scope
from app.models import Job
from app.schemas import JobLogLine, JobOut

POLL_INTERVAL_S = 0.5


def _snapshot(job_id: str, after: int) -> tuple[JobOut | None, list[JobLogLine]]:
    with session_scope() as session:
        # by id alone: the route that opened the stream found the job within the caller's tenant
        job = session.get(Job, job_id)
        if job is None:
            return None, []
        # no limit: a job keeps at most job_log_max_lines lines
        lines = [JobLogLine.from_row(row) for row in joblog.read(session, job_id, after, limit=None)]
        return JobOut.from_row(job), lines


async def job_events(job_id: str, poll_interval_s: float = POLL_INTERVAL_S, after: int = 0) -> AsyncIterator[dict]:
    """`log` events (each a JobLogLine, its seq as `seq`, no event id: the ids number the
    status and progress events), then `status` or `progress` when the job changed. Log
    lines start after the line `after`."""
    last_status, last_progress, sequence = None, None, 0
    while True:
        job, lines = await to_thread.run_sync(_snapshot, job_id, after)
        if job is None:  # deleted while followed
            return
        for line in lines:
            yield {"event": "log", "data": line.model_dump_json()}
            after = line.seq
        if job.status != last_status or job.progress != last_progress:
            sequence += 1
            kind = "status" if job.status != last_status else "progress"
            yield {"event": kind, "id": str(sequence), "data": job.model_dump_json()}
            last_status, last_progress = job.status, job.progress
        if job.status.terminal:
            return
        await anyio.sleep(poll_interval_s)
