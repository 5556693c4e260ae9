"""Server-sent events that carry HTML, for htmx's SSE extension to swap into the pages.

A job page follows the API's own event stream (`app.events.job_events`, which polls the job
row and its log) and turns each event into the page's state panel or a line of its log. The job list has no
API stream of its own: it polls its page of jobs, with the filters it was opened with, and
sends the table again whenever what it shows changed (a status, a progress bar, a new
job); the list stays open until the browser leaves the page.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlencode

import anyio
from anyio import to_thread

from app import crud
from app.core.config import get_settings
from app.core.db import session_scope
from app.dashboard.templating import fragment
from app.dashboard.views import stage_bars
from app.events import job_events
from app.models import JobStatus
from app.schemas import JobLogLine, JobOut

LIST_POLL_INTERVAL_S = 1.0


def job_state_html(job: JobOut) -> str:
    return fragment("_job_state.html", job=job, bars=stage_bars(job))


def log_line_html(line: JobLogLine) -> str:
    return fragment("_log_line.html", line=line)


async def job_page_events(job_id: str, after: int = 0) -> AsyncIterator[dict]:
    """`log` (one stored line, after the page's last one) as lines are written, `state` (the
    panel) per change, then `end` once the job finished: the page closes its connection on
    `end` instead of reconnecting to a finished stream. Only log events carry an id, the
    line's seq: a reconnecting browser sends the last one as Last-Event-ID, and the stream
    goes on from there without repeating lines."""
    async for event in job_events(job_id, after=after):
        if event["event"] == "log":
            line = JobLogLine.model_validate_json(event["data"])
            yield {"event": "log", "id": str(line.seq), "data": log_line_html(line)}
            continue
        # by name: the JSON was written by field name, and some fields validate by an alias
        job = JobOut.model_validate_json(event["data"], by_name=True)
        yield {"event": "state", "data": job_state_html(job)}
        if job.status.terminal:
            yield {"event": "end", "data": job.status.value}


def list_page(tenant_id: str, status: JobStatus | None, model: str | None, limit: int, offset: int) -> dict:
    """One page of the tenant's job list, with its count and the links to its neighbours."""
    settings = get_settings()
    with session_scope() as session:
        rows, total = crud.list_jobs(session, tenant_id, status, limit, offset, model_contains=model)
        jobs = [JobOut.from_row(row, settings) for row in rows]
    filters = {"status": status.value if status else None, "model": model or None, "limit": limit}

    def link(to: int) -> str:
        return "/?" + urlencode({k: v for k, v in {**filters, "offset": to}.items() if v})

    return {
        "jobs": jobs, "total": total, "offset": offset, "limit": limit,
        "previous_url": link(max(offset - limit, 0)) if offset > 0 else None,
        "next_url": link(offset + limit) if offset + limit < total else None,
    }


def table_html(listing: dict) -> str:
    return fragment("_job_table.html", **listing)


async def job_list_events(
    tenant_id: str,
    status: JobStatus | None, model: str | None, limit: int, offset: int, poll_interval_s: float = LIST_POLL_INTERVAL_S
) -> AsyncIterator[dict]:
    last = None
    while True:
        html = table_html(await to_thread.run_sync(list_page, tenant_id, status, model, limit, offset))
        if html != last:
            yield {"event": "table", "data": html}
            last = html
        await anyio.sleep(poll_interval_s)
