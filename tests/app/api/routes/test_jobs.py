import hashlib
import json
import sqlite3

from app.models import JobStatus, utcnow

PROBLEM = "https://qforge.dev/problems/"


def broker_messages(settings) -> list[dict]:
    """Messages waiting in the embedded (SQLite) broker."""
    with sqlite3.connect(settings.data_dir / "broker.db") as db:
        return [json.loads(row[0]) for row in db.execute("SELECT payload FROM kombu_message WHERE visible")]


def test_submit_stores_a_queued_job_and_enqueues_it(submit, settings, job_count):
    response = submit()
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempts"] == 0 and job["artifact"] is None
    assert job["recipe"]["name"] == "w4a16-rtn-g64"  # the preset, expanded as it will run
    assert job["recipe"]["stages"][0]["weights"]["group_size"] == 64
    assert job["request"]["evaluation"]["perplexity_tokens"] == 16384
    assert job_count() == 1
    messages = broker_messages(settings)
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == "worker.tasks.run_quantization_job"
    assert messages[0]["headers"]["argsrepr"] == repr([job["id"]]) or job["id"] in messages[0]["body"]


def test_same_idempotency_key_returns_the_same_job(submit, settings, job_count):
    first = submit(headers={"Idempotency-Key": "k-1"})
    again = submit(headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert job_count() == 1
    assert len(broker_messages(settings)) == 1
    other = submit(headers={"Idempotency-Key": "k-2"})
    assert other.json()["id"] != first.json()["id"]


def test_idempotency_key_reused_for_another_request_is_refused(submit, job_count):
    submit(headers={"Idempotency-Key": "k-1"})
    response = submit({"model": "bundled:smollm2-135m", "recipe": "w8a16-rtn"}, headers={"Idempotency-Key": "k-1"})
    assert response.status_code == 422
    assert response.json()["type"] == PROBLEM + "idempotency-key-reused"
    assert job_count() == 1


def test_a_broker_failure_fails_the_job_with_the_reason(submit, monkeypatch, client):
    from app import queue

    def refuse(job_id):
        raise ConnectionError("broker down")

    monkeypatch.setattr(queue, "enqueue", refuse)
    response = submit(headers={"Idempotency-Key": "k-broker"})
    assert response.status_code == 503
    problem = response.json()
    assert problem["type"] == PROBLEM + "broker-unavailable"
    job = client.get(f"/v1/jobs/{problem['job_id']}").json()
    assert job["status"] == "failed"
    assert "ConnectionError: broker down" in job["error"]
    # the broker is back: the client's retry with the same key queues the job anew
    monkeypatch.undo()
    monkeypatch.setattr(queue, "enqueue", lambda job_id: None)
    retried = submit(headers={"Idempotency-Key": "k-broker"})
    assert retried.status_code == 202 and retried.json()["id"] != problem["job_id"]
    assert retried.json()["status"] == "queued"
    assert submit(headers={"Idempotency-Key": "k-broker"}).json()["id"] == retried.json()["id"]  # and keeps it


def test_list_is_newest_first_with_filter_and_pagination(submit, client, set_job):
    ids = [submit().json()["id"] for _ in range(5)]
    set_job(ids[1], status=JobStatus.FAILED, error="boom", finished_at=utcnow())
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert page["total"] == 5 and page["limit"] == 2 and page["offset"] == 0
    assert [j["id"] for j in page["items"]] == ids[::-1][:2]
    rest = client.get("/v1/jobs", params={"limit": 2, "offset": 4}).json()
    assert [j["id"] for j in rest["items"]] == [ids[0]]
    failed = client.get("/v1/jobs", params={"status": "failed"}).json()
    assert failed["total"] == 1 and failed["items"][0]["id"] == ids[1]
    assert client.get("/v1/jobs", params={"status": "queued"}).json()["total"] == 4
    bad = client.get("/v1/jobs", params={"status": "paused", "limit": 0})
    assert bad.status_code == 422
    assert {"status", "limit"} <= {e["loc"][-1] for e in bad.json()["errors"]}


def test_unknown_job_is_404_everywhere(client):
    for path in ("", "/report", "/artifact", "/events"):
        response = client.get(f"/v1/jobs/0123abcd{path}")
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == PROBLEM + "job-not-found"
        assert "0123abcd" in response.json()["detail"]
    assert client.post("/v1/jobs/0123abcd/cancel").status_code == 404
    assert client.get("/v1/nothing-here").json()["type"] == PROBLEM + "not-found"


def test_cancel_a_queued_job_at_once(submit, client):
    job_id = submit().json()["id"]
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]
    again = client.post(f"/v1/jobs/{job_id}/cancel")  # a retried cancel: the same answer, no error
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert again.json()["finished_at"] == response.json()["finished_at"]


def test_a_finished_job_cannot_be_cancelled(submit, client, set_job):
    job_id = submit().json()["id"]
    set_job(job_id, status="succeeded")
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert response.json()["type"] == PROBLEM + "job-finished"


def test_cancel_a_running_job_asks_its_worker(submit, client, set_job):
    job_id = submit().json()["id"]
    set_job(job_id, status=JobStatus.RUNNING, attempts=1, started_at=utcnow(), heartbeat_at=utcnow())
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "running" and response.json()["cancel_requested"] is True


def test_cancelling_a_running_job_is_202_even_if_its_worker_stops_before_the_answer(submit, client, set_job, monkeypatch):
    from app import crud

    job_id = submit().json()["id"]
    set_job(job_id, status=JobStatus.RUNNING, attempts=1, started_at=utcnow(), heartbeat_at=utcnow())
    request_cancel = crud.request_cancel

    def worker_is_quick(session, job):  # the worker sees the flag and stops before the route reads the job back
        outcome = request_cancel(session, job)
        set_job(job_id, status=JobStatus.CANCELLED, finished_at=utcnow())
        return outcome

    monkeypatch.setattr(crud, "request_cancel", worker_is_quick)
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"


def test_report_and_artifact_are_409_until_the_job_succeeds(submit, client, set_job):
    job_id = submit().json()["id"]
    for path in ("report", "artifact"):
        response = client.get(f"/v1/jobs/{job_id}/{path}")
        assert response.status_code == 409
        assert response.json()["type"] == PROBLEM + "job-not-finished"
        assert "queued" in response.json()["detail"]
    set_job(job_id, status=JobStatus.FAILED, error="ValueError: group_size 7 does not divide 576", finished_at=utcnow())
    response = client.get(f"/v1/jobs/{job_id}/report")
    assert response.status_code == 409
    assert response.json()["type"] == PROBLEM + "job-not-succeeded"
    assert "group_size 7" in response.json()["detail"]


def test_finished_job_serves_report_and_artifact_with_checksum_and_ranges(submit, client, set_job, settings):
    job_id = submit().json()["id"]
    payload = bytes(range(256)) * 40
    (settings.artifact_dir).mkdir(parents=True, exist_ok=True)
    (settings.artifact_dir / f"{job_id}.tar").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    report = {"metrics": {"quantized": {"perplexity": 12.3}}}
    set_job(
        job_id, status=JobStatus.SUCCEEDED, finished_at=utcnow(), report=report,
        artifact_path=f"{job_id}.tar", artifact_sha256=sha, artifact_bytes=len(payload),
    )
    assert client.get(f"/v1/jobs/{job_id}/report").json() == report
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["artifact"] == {"url": f"/v1/jobs/{job_id}/artifact", "sha256": sha, "bytes": len(payload), "format": None}

    whole = client.get(f"/v1/jobs/{job_id}/artifact")
    assert whole.status_code == 200 and whole.content == payload
    assert whole.headers["x-checksum-sha256"] == sha
    assert whole.headers["accept-ranges"] == "bytes"
    assert f'filename="qforge-{job_id}.tar"' in whole.headers["content-disposition"]

    part = client.get(f"/v1/jobs/{job_id}/artifact", headers={"Range": "bytes=100-1123"})
    assert part.status_code == 206
    assert part.content == payload[100:1124]
    assert part.headers["content-range"] == f"bytes 100-1123/{len(payload)}"
    beyond = client.get(f"/v1/jobs/{job_id}/artifact", headers={"Range": f"bytes={len(payload) + 10}-"})
    assert beyond.status_code == 416
    assert beyond.json()["type"] == PROBLEM + "range-not-satisfiable"  # problem+json as every error
    assert beyond.headers["content-range"] == f"bytes */{len(payload)}"

    (settings.artifact_dir / f"{job_id}.tar").unlink()
    assert client.get(f"/v1/jobs/{job_id}/artifact").json()["type"] == PROBLEM + "artifact-gone"


def test_each_export_format_downloads_as_its_own_artifact(submit, client, set_job, settings):
    job_id = submit().json()["id"]
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    files = {"qforge": (f"{job_id}.tar", b"q" * 3000), "compressed-tensors": (f"{job_id}.compressed-tensors.tar", b"c" * 5000)}
    artifacts = []
    for fmt, (name, payload) in files.items():
        (settings.artifact_dir / name).write_bytes(payload)
        artifacts.append({"format": fmt, "folder": "x", "file": name, "sha256": hashlib.sha256(payload).hexdigest(),
                          "bytes": len(payload)})
    main = artifacts[0]
    set_job(job_id, status=JobStatus.SUCCEEDED, finished_at=utcnow(), report={"artifacts": artifacts},
            artifact_path=main["file"], artifact_sha256=main["sha256"], artifact_bytes=main["bytes"])

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["artifact"]["format"] == "qforge"
    assert [(a["format"], a["bytes"]) for a in job["artifacts"]] == [("qforge", 3000), ("compressed-tensors", 5000)]
    ct = client.get(job["artifacts"][1]["url"])
    assert ct.status_code == 200 and ct.content == b"c" * 5000
    assert ct.headers["x-checksum-sha256"] == artifacts[1]["sha256"]
    assert f'filename="qforge-{job_id}-compressed-tensors.tar"' in ct.headers["content-disposition"]
    part = client.get(job["artifacts"][1]["url"], headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == b"c" * 10
    assert client.get(f"/v1/jobs/{job_id}/artifact?format=qforge").content == b"q" * 3000

    missing = client.get(f"/v1/jobs/{job_id}/artifact?format=gguf")
    assert missing.status_code == 404
    assert missing.json()["type"] == PROBLEM + "artifact-format-not-exported"
    assert "qforge, compressed-tensors" in missing.json()["detail"]


def test_events_of_a_finished_job_end_with_its_status(submit, client, set_job):
    job_id = submit().json()["id"]
    set_job(job_id, status=JobStatus.CANCELLED, finished_at=utcnow())
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = [block for block in text.split("\r\n\r\n") if block.strip() and not block.startswith(":")]
    assert len(events) == 1
    lines = dict(line.split(": ", 1) for line in events[0].splitlines())
    assert lines["event"] == "status"
    assert json.loads(lines["data"])["status"] == "cancelled"


def test_requests_return_every_database_connection_they_take(submit, client, settings):
    """A request's session is made and closed in its own task, the close of one still in a
    read's transaction in a worker thread: after submissions, polls, lists, logs, cancels,
    404s and refused calls, no connection is left checked out of the pool."""
    from app.core.db import get_engine

    for _ in range(5):
        job_id = submit().json()["id"]
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        assert client.get("/v1/jobs?limit=5").status_code == 200
        assert client.get(f"/v1/jobs/{job_id}/logs").status_code == 200
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        assert client.get("/v1/jobs/nope").status_code == 404
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer qf_nope"}).status_code == 401
    assert get_engine().pool.checkedout() == 0
