"""GET /v1/jobs/{id}/logs: the stored lines in order, paged by `after` and `limit`; cancel
requests and broker failures write their own lines; the event stream carries new lines."""

from app import joblog
from app.core.db import session_scope
from app.events import job_events
from app.models import JobStatus, LogLevel


def write(job_id: str, count: int) -> None:
    with session_scope() as session:
        for i in range(count):
            joblog.append(session, job_id, f"line {i}", stage="quantize", attempt=1)


def test_pages_follow_after_and_limit(submit, client):
    job_id = submit().json()["id"]
    write(job_id, 5)
    first = client.get(f"/v1/jobs/{job_id}/logs", params={"limit": 2}).json()
    assert [line["message"] for line in first["items"]] == ["line 0", "line 1"]
    assert first["next_after"] == first["items"][-1]["seq"]
    assert first["items"][0]["stage"] == "quantize" and first["items"][0]["attempt"] == 1
    assert first["items"][0]["level"] == "info" and first["items"][0]["at"]
    rest = client.get(f"/v1/jobs/{job_id}/logs", params={"after": first["next_after"], "limit": 10}).json()
    assert [line["message"] for line in rest["items"]] == ["line 2", "line 3", "line 4"]
    done = client.get(f"/v1/jobs/{job_id}/logs", params={"after": rest["next_after"]}).json()
    assert done == {"items": [], "next_after": rest["next_after"]}


def test_unknown_job_and_bad_paging_are_problems(submit, client):
    missing = client.get("/v1/jobs/0123abcd/logs")
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    job_id = submit().json()["id"]
    for params in ({"limit": 0}, {"limit": 1001}, {"after": -1}):
        response = client.get(f"/v1/jobs/{job_id}/logs", params=params)
        assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"


def test_cancel_requests_are_logged(submit, client, set_job):
    queued, running = submit().json()["id"], submit().json()["id"]
    set_job(running, status=JobStatus.RUNNING, attempts=1)
    client.post(f"/v1/jobs/{queued}/cancel")
    client.post(f"/v1/jobs/{running}/cancel")
    client.post(f"/v1/jobs/{queued}/cancel")  # a retried cancel changes nothing, logs nothing
    [line] = client.get(f"/v1/jobs/{queued}/logs").json()["items"]
    assert (line["level"], line["message"], line["attempt"]) == ("warning", "cancelled before it started", None)
    [line] = client.get(f"/v1/jobs/{running}/logs").json()["items"]
    assert line["level"] == "warning" and line["message"].startswith("cancellation requested")


def test_a_job_the_broker_refused_logs_why(submit, client, monkeypatch):
    def refuse(job_id: str) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr("app.queue.enqueue", refuse)
    job_id = submit().json()["job_id"]
    [line] = client.get(f"/v1/jobs/{job_id}/logs").json()["items"]
    assert line["level"] == "error" and line["message"] == "failed: could not queue the job: ConnectionError: broker down"


def test_the_event_stream_sends_new_lines_before_the_jobs_state(submit, set_job):
    import anyio

    job_id = submit().json()["id"]
    write(job_id, 2)
    with session_scope() as session:
        joblog.append(session, job_id, "cancelled before it started", LogLevel.WARNING)
    set_job(job_id, status=JobStatus.CANCELLED)

    async def collect() -> list[dict]:
        with anyio.fail_after(10):
            return [event async for event in job_events(job_id)]

    events = anyio.run(collect)
    assert [e["event"] for e in events] == ["log", "log", "log", "status"]
    assert "cancelled before it started" in events[2]["data"] and '"status":"cancelled"' in events[3]["data"]
