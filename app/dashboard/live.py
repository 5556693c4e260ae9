"""Server-sent events that carry HTML, for htmx's SSE extension to swap into the pages.

A job page follows the API's own event stream (`app.events.job_events`, which polls the job
row) and turns each event into the page's state panel and a log line. The job list has no
API stream of its own: it polls its page of jobs, with the filters it was opened with, and
sends the table body again whenever what it shows changed (a status, a progress bar, a new
job); the list stays open until the browser leaves the page.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from anyio import to_thread

from app import crud
from app.core.config import get_settings
from app.core.db import session_scope
from app.dashboard.templating import fragment
from app.dashboard.views import job_recipe_name, stage_bars
from app.events import job_events
from app.models import JobStatus
from app.schemas import JobOut

LIST_POLL_INTERVAL_S = 1.0


def job_state_html(job: JobOut) -> str:
    return fragment("_job_state.html", job=job, bars=stage_bars(job))


def log_line_html(job: JobOut) -> str:
    return fragment("_log_line.html", job=job)


async def job_page_events(job_id: str) -> AsyncIterator[dict]:
    """`state` (the panel), `log` (one line) per change, then `end` once the job finished:
    the page closes its connection on `end` instead of reconnecting to a finished stream."""
    async for event in job_events(job_id):
        job = JobOut.model_validate_json(event["data"])
        yield {"event": "state", "id": event["id"], "data": job_state_html(job)}
        yield {"event": "log", "data": log_line_html(job)}
        if job.status.terminal:
            yield {"event": "end", "data": job.status.value}


def list_page(status: JobStatus | None, model: str | None, limit: int, offset: int) -> tuple[list[JobOut], int]:
    settings = get_settings()
    with session_scope() as session:
        rows, total = crud.list_jobs(session, status, limit, offset, model_contains=model)
        return [JobOut.from_row(row, settings) for row in rows], total


def rows_html(jobs: list[JobOut]) -> str:
    return fragment("_job_rows.html", jobs=jobs, recipe_name=job_recipe_name)


async def job_list_events(
    status: JobStatus | None, model: str | None, limit: int, offset: int, poll_interval_s: float = LIST_POLL_INTERVAL_S
) -> AsyncIterator[dict]:
    last = None
    while True:
        jobs, _ = await to_thread.run_sync(list_page, status, model, limit, offset)
        html = rows_html(jobs)
        if html != last:
            yield {"event": "rows", "data": html}
            last = html
        await anyio.sleep(poll_interval_s)
