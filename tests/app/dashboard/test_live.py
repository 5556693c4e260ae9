"""The HTML event streams: a job page's panel and log follow the job row and its stored log
to its end; the
job list sends its table again when a job on it changes, and only then."""

import anyio

from app import joblog
from app.core.db import session_scope
from app.dashboard import live
from app.models import DEFAULT_TENANT, JobStatus, LogLevel


def first_events(stream, count: int, between=None) -> list[dict]:
    """The first `count` events of an async stream; `between(i)` runs after event i."""

    async def collect() -> list[dict]:
        events = []
        with anyio.fail_after(20):
            async for event in stream:
                events.append(event)
                if len(events) == count:
                    break
                if between is not None:
                    await anyio.to_thread.run_sync(between, len(events))
        await stream.aclose()
        return events

    return anyio.run(collect)


def add_line(job_id: str, message: str, level=LogLevel.INFO, stage=None) -> int:
    with session_scope() as session:
        joblog.append(session, job_id, message, level, stage=stage)
    with session_scope() as session:
        return joblog.read(session, job_id, limit=None)[-1].id


def sse_blocks(text: str) -> list[dict[str, str]]:
    """Each event of a stream as {field: value} (data lines joined), pings left out."""
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n") if b.strip() and not b.startswith(":")]
    events = []
    for block in blocks:
        fields: dict[str, str] = {}
        for line in block.splitlines():
            name, _, value = line.partition(": ")
            fields[name] = fields[name] + "\n" + value if name in fields else value
        events.append(fields)
    return events


def test_a_finished_job_streams_its_stored_log_its_panel_and_the_end(client, succeeded_job, html):
    job_id, _ = succeeded_job()
    first = add_line(job_id, "started")
    second = add_line(job_id, "failed: nothing really", LogLevel.ERROR, stage="quantize")
    with client.stream("GET", f"/jobs/{job_id}/live") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_blocks("".join(response.iter_text()))
    assert [e["event"] for e in events] == ["log", "log", "state", "end"]
    # only log lines carry ids, their seq: what a reconnecting browser sends back
    assert [e.get("id") for e in events] == [str(first), str(second), None, None]
    line = html(events[1]["data"])
    assert line.find_all("li")[0].attrs["data-seq"] == str(second)
    assert "[quantize] failed: nothing really" in line.text and "error" in line.text
    panel = html(events[2]["data"])
    assert panel.find_all("strong", data_testid="status")[0].text == "succeeded"
    assert [a.attrs["href"] for a in panel.find_all("a")][0] == f"/jobs/{job_id}/report"


def test_the_page_stream_goes_on_after_the_pages_last_line_or_the_last_event_id(client, succeeded_job):
    job_id, _ = succeeded_job()
    seqs = [add_line(job_id, f"line {i}") for i in range(3)]
    with client.stream("GET", f"/jobs/{job_id}/live?after={seqs[0]}") as response:
        after_query = [e.get("id") for e in sse_blocks("".join(response.iter_text())) if e["event"] == "log"]
    headers = {"Last-Event-ID": str(seqs[1])}
    with client.stream("GET", f"/jobs/{job_id}/live?after={seqs[0]}", headers=headers) as response:
        after_header = [e.get("id") for e in sse_blocks("".join(response.iter_text())) if e["event"] == "log"]
    assert after_query == [str(seqs[1]), str(seqs[2])]
    assert after_header == [str(seqs[2])]


def test_a_running_job_streams_each_change_and_new_log_line_until_it_ends(submit, set_job, settings):
    job_id = submit().json()["id"]

    def advance(n: int) -> None:  # after each state, the worker moves on and logs it
        if n == 1:
            set_job(job_id, status=JobStatus.RUNNING, progress_stage="quantize", progress_current=5,
                    progress_total=210, progress_message="model.layers.0.mlp.up_proj")
            add_line(job_id, "quantize started: model.layers.0.mlp.up_proj", stage="quantize")
        if n == 3:
            set_job(job_id, status=JobStatus.CANCELLED, progress_message="cancelled")
            add_line(job_id, "cancelled on request", LogLevel.WARNING, stage="quantize")

    events = first_events(live.job_page_events(job_id), 6, between=advance)
    assert [e["event"] for e in events] == ["state", "log", "state", "log", "state", "end"]
    assert "quantize started: model.layers.0.mlp.up_proj" in events[1]["data"]
    assert "5 of 210" in events[2]["data"] and "cancelled on request" in events[3]["data"]
    assert events[-1]["data"] == "cancelled"


def test_the_list_stream_sends_the_table_when_a_job_on_it_changes(submit, set_job, settings, html):
    job_id = submit().json()["id"]
    stream = live.job_list_events(DEFAULT_TENANT, None, None, 20, 0, poll_interval_s=0.05)
    changed = []

    def change(n: int) -> None:
        if n == 1:
            set_job(job_id, status=JobStatus.RUNNING, progress_percent=30.0, progress_stage="baseline")
            changed.append(submit().json()["id"])  # a new job appears on the page too

    first, second = first_events(stream, 2, between=change)
    assert first["event"] == second["event"] == "table"
    before, after = html(first["data"]), html(second["data"])
    assert before.by_id(f"job-{job_id}").attrs["data-status"] == "queued"
    assert after.by_id(f"job-{job_id}").attrs["data-status"] == "running"
    assert after.by_id(f"job-{changed[0]}") and after.by_id("job-count").text.startswith("2 jobs")


def test_the_list_stream_is_quiet_while_nothing_changes(submit, settings):
    submit()

    async def count_events() -> int:
        seen = 0
        with anyio.move_on_after(0.6):  # a dozen polls
            async for _ in live.job_list_events(DEFAULT_TENANT, None, None, 20, 0, poll_interval_s=0.05):
                seen += 1
        return seen

    assert anyio.run(count_events) == 1


def test_a_job_with_a_webhook_streams_its_delivery_state(submit, set_job, settings, monkeypatch):
    from app.core.config import get_settings

    monkeypatch.setenv("QFORGE_WEBHOOK_SECRET", "s3cr3t")
    get_settings.cache_clear()
    body = {"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64", "callback_url": "http://127.0.0.1:9/hook"}
    response = submit(body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    set_job(job_id, status=JobStatus.CANCELLED)
    state, end = first_events(live.job_page_events(job_id), 2)
    assert "Webhook" in state["data"] and "pending" in state["data"] and end["event"] == "end"
    assert "s3cr3t" not in state["data"]
