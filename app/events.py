"""The event stream of one job, for `GET /v1/jobs/{id}/events`.

The worker is another process and the database is the only place a job's state lives, so
the stream polls the job row and sends what changed. Polling twice a second costs one
primary-key read per follower, and needs no message bus beside the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from anyio import to_thread

from app import crud
from app.core.db import session_scope
from app.schemas import JobOut

POLL_INTERVAL_S = 0.5


def _snapshot(job_id: str) -> JobOut | None:
    with session_scope() as session:
        job = crud.get_job(session, job_id)
        return JobOut.from_row(job) if job is not None else None


async def job_events(job_id: str, poll_interval_s: float = POLL_INTERVAL_S) -> AsyncIterator[dict]:
    last_status, last_progress, sequence = None, None, 0
    while True:
        job = await to_thread.run_sync(_snapshot, job_id)
        if job is None:  # deleted while followed
            return
        if job.status != last_status or job.progress != last_progress:
            sequence += 1
            kind = "status" if job.status != last_status else "progress"
            yield {"event": kind, "id": str(sequence), "data": job.model_dump_json()}
            last_status, last_progress = job.status, job.progress
        if job.status.terminal:
            return
        await anyio.sleep(poll_interval_s)
