"""The SDK's retries against a scripted local HTTP server: 5xx and 429 are retried with
backoff (429 after its Retry-After), 4xx never, attempts are bounded, a submit keeps one
idempotency key over its retries, an upload is not repeated once the server may have
stored it, and a broken download resumes where it stopped."""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest

from app.schemas import ArtifactInfo, JobOut, JobProgress
from qforge.client import (
    AsyncClient,
    ChecksumMismatch,
    Client,
    JobFailed,
    QforgeError,
    RetryPolicy,
    ServerUnavailable,
)
from qforge.client.retry import parse_retry_after

FAST = RetryPolicy(backoff_s=0.05, jitter=False)
PROBLEM = "https://qforge.dev/problems/"


class Reply:
    def __init__(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None, cut_at: int | None = None):
        self.status, self.headers, self.cut_at = status, dict(headers or {}), cut_at
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        if not isinstance(body, bytes):
            self.headers.setdefault("Content-Type", "application/problem+json" if status >= 400 else "application/json")


class Scripted:
    """A local server answering each (method, path) from a list of replies, in order (the
    last one repeats); it records every request it receives."""

    def __init__(self) -> None:
        self.script: dict[tuple[str, str], list[Reply]] = {}
        self.seen: list[dict] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                scripted.seen.append({"method": self.command, "path": path, "query": self.path.partition("?")[2],
                                      "headers": dict(self.headers),
                                      "body": body, "at": time.monotonic()})
                replies = scripted.script.get((self.command, path)) or [Reply(404, {"type": PROBLEM + "not-found",
                                                                              "title": "Not found", "status": 404})]
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body[: reply.cut_at] if reply.cut_at is not None else reply.body)
                self.close_connection = True  # a cut reply ends here: the client sees a short body

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def requests(self, method: str, path: str) -> list[dict]:
        return [r for r in self.seen if r["method"] == method and r["path"] == path]


@pytest.fixture
def stub():
    server = Scripted()
    yield server
    server.server.shutdown()
    server.server.server_close()


def job_json(job_id: str = "ab" * 16, artifact: ArtifactInfo | None = None) -> dict:
    now = dt.datetime.now(dt.UTC)
    job = JobOut(id=job_id, status="succeeded" if artifact else "queued", model="bundled:smollm2-135m", recipe={},
                 request={}, progress=JobProgress(), cancel_requested=False, attempts=1, artifact=artifact,
                 artifacts=[artifact] if artifact else [], created_at=now, started_at=None, finished_at=None,
                 updated_at=now, heartbeat_at=None)
    return job.model_dump(mode="json")


PRESETS = [{"name": "w4a16-rtn-g64", "description": "int4", "recipe": {"name": "w4a16-rtn-g64", "stages": []}}]


def test_5xx_is_retried_with_growing_backoff_until_it_succeeds(stub):
    stub.script[("GET", "/v1/recipes/presets")] = [Reply(503, {"title": "busy"}), Reply(502, b"<html>bad gateway</html>"),
                                                   Reply(200, PRESETS)]
    with Client(stub.url, api_key="k-123", retry=FAST) as qf:
        presets = qf.presets()
    assert [p.name for p in presets] == ["w4a16-rtn-g64"]
    tries = stub.requests("GET", "/v1/recipes/presets")
    assert len(tries) == 3
    gaps = [b["at"] - a["at"] for a, b in zip(tries, tries[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1, gaps  # 0.05 s, then doubled
    assert all(t["headers"]["Authorization"] == "Bearer k-123" for t in tries)


def test_a_4xx_is_never_retried_and_its_problem_is_parsed(stub):
    problem = {"type": PROBLEM + "job-not-found", "title": "Job not found", "status": 404, "detail": "no job with id 'x'"}
    stub.script[("GET", "/v1/jobs/x")] = [Reply(404, problem), Reply(200, job_json())]
    with Client(stub.url, retry=FAST) as qf, pytest.raises(QforgeError) as caught:
        qf.get("x")
    error = caught.value
    assert (error.status, error.type, error.title) == (404, problem["type"], "Job not found")
    assert error.detail == problem["detail"]
    assert error.slug == "job-not-found" and error.is_client_error
    assert len(stub.requests("GET", "/v1/jobs/x")) == 1


def test_429_waits_as_long_as_retry_after_says(stub):
    slow_down = Reply(429, {"title": "slow down"}, {"Retry-After": "1"})
    stub.script[("GET", "/v1/recipes/presets")] = [slow_down, Reply(200, PRESETS)]
    with Client(stub.url, retry=RetryPolicy(backoff_s=0.01, jitter=False)) as qf:
        qf.presets()
    first, second = stub.requests("GET", "/v1/recipes/presets")
    assert second["at"] - first["at"] >= 1.0  # Retry-After, not the 0.01 s backoff


def test_retries_are_bounded(stub):
    not_ready = {"type": PROBLEM + "not-ready", "title": "Not ready", "status": 503}
    stub.script[("GET", "/v1/recipes/presets")] = [Reply(503, not_ready)]
    with Client(stub.url, retry=RetryPolicy(attempts=3, backoff_s=0.01)) as qf, pytest.raises(QforgeError) as caught:
        qf.presets()
    assert caught.value.status == 503 and caught.value.slug == "not-ready"
    assert len(stub.requests("GET", "/v1/recipes/presets")) == 3


def test_an_unreachable_server_is_ServerUnavailable_after_the_retries(closed_port):
    started = time.monotonic()
    with Client(f"http://127.0.0.1:{closed_port}", retry=RetryPolicy(attempts=3, backoff_s=0.1, jitter=False)) as qf:
        with pytest.raises(ServerUnavailable) as caught:
            qf.get("ab" * 16)
    assert time.monotonic() - started >= 0.3  # two backoffs, 0.1 then 0.2 s
    assert caught.value.status is None and "ConnectError" in caught.value.detail


def test_a_submit_keeps_one_idempotency_key_over_its_retries(stub):
    stub.script[("POST", "/v1/jobs")] = [Reply(502, b"bad gateway"), Reply(202, job_json())]
    with Client(stub.url, retry=FAST) as qf:
        qf.submit("bundled:smollm2-135m", "w4a16-rtn-g64", evaluation={"perplexity_tokens": 512})
        stub.script[("POST", "/v1/jobs")] = [Reply(202, job_json())]
        qf.submit("bundled:smollm2-135m", "w4a16-rtn-g64")
    first, retried, other = (r["headers"]["Idempotency-Key"] for r in stub.requests("POST", "/v1/jobs"))
    assert first == retried and other != first
    assert json.loads(stub.requests("POST", "/v1/jobs")[0]["body"]) == {
        "model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64", "evaluation": {"perplexity_tokens": 512}}


def test_a_submit_the_broker_refused_is_retried_with_its_key(stub):
    # the server fails the job it could not queue and releases its key: the retry, with the
    # same key, queues the job once the broker is back
    problem = {"type": PROBLEM + "broker-unavailable", "title": "Job queue unavailable", "status": 503, "job_id": "j"}
    stub.script[("POST", "/v1/jobs")] = [Reply(503, problem), Reply(202, job_json())]
    with Client(stub.url, retry=FAST) as qf:
        job = qf.submit("bundled:smollm2-135m", "w4a16-rtn-g64")
    assert job.id == job_json()["id"]
    first, retried = (r["headers"]["Idempotency-Key"] for r in stub.requests("POST", "/v1/jobs"))
    assert first == retried


def test_an_upload_is_repeated_only_when_the_server_surely_did_not_store_it(stub, tmp_path):
    data = tmp_path / "calibration.jsonl"
    data.write_text('{"text": "hello"}\n' * 100)
    dataset = {"id": "cd" * 16, "name": "calibration.jsonl", "format": "jsonl", "kind": "text", "samples": 100,
               "x_shape": None, "has_labels": False, "classes": None, "bytes": data.stat().st_size,
               "sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "created_at": "2026-01-01T00:00:00Z"}
    stub.script[("POST", "/v1/datasets")] = [Reply(503, {"title": "busy"}), Reply(201, dataset)]
    with Client(stub.url, retry=FAST) as qf:
        assert qf.upload_dataset(data).samples == 100
        tries = stub.requests("POST", "/v1/datasets")
        assert len(tries) == 2 and all(data.read_bytes() in t["body"] for t in tries)  # the file, whole, each time

        stub.script[("POST", "/v1/datasets")] = [Reply(500, {"title": "oops", "status": 500}), Reply(201, dataset)]
        with pytest.raises(QforgeError) as caught:
            qf.upload_dataset(data)
    assert caught.value.status == 500 and len(stub.requests("POST", "/v1/datasets")) == 3


def artifact_job(stub, content: bytes, claimed_sha256: str | None = None) -> str:
    job_id = "ef" * 16
    sha = claimed_sha256 or hashlib.sha256(content).hexdigest()
    info = ArtifactInfo(url=f"/v1/jobs/{job_id}/artifact", sha256=sha, bytes=len(content), format="qforge")
    stub.script[("GET", f"/v1/jobs/{job_id}")] = [Reply(200, job_json(job_id, info))]
    return job_id


def test_a_broken_download_resumes_where_it_stopped(stub, tmp_path):
    content = bytes(range(256)) * 4096  # 1 MiB
    job_id = artifact_job(stub, content)
    sha = hashlib.sha256(content).hexdigest()
    half = len(content) // 2
    rest = Reply(206, content[half:], {"Content-Range": f"bytes {half}-{len(content) - 1}/{len(content)}",
                                        "X-Checksum-SHA256": sha})
    cut = Reply(200, content, {"X-Checksum-SHA256": sha}, cut_at=half)
    stub.script[("GET", f"/v1/jobs/{job_id}/artifact")] = [cut, rest]
    with Client(stub.url, retry=FAST) as qf:
        path = qf.download(job_id, tmp_path)
    assert path == tmp_path / f"qforge-{job_id}.tar"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    first, second = stub.requests("GET", f"/v1/jobs/{job_id}/artifact")
    assert "Range" not in first["headers"] and second["headers"]["Range"] == f"bytes={half}-"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_download_that_does_not_match_its_sha256_leaves_no_file(stub, tmp_path):
    content = b"x" * 10_000
    job_id = artifact_job(stub, content, claimed_sha256="0" * 64)
    stub.script[("GET", f"/v1/jobs/{job_id}/artifact")] = [Reply(200, content, {"X-Checksum-SHA256": "0" * 64})]
    with Client(stub.url, retry=FAST) as qf, pytest.raises(ChecksumMismatch) as caught:
        qf.download(job_id, tmp_path / "model.tar")
    assert caught.value.actual == hashlib.sha256(content).hexdigest() and caught.value.expected == "0" * 64
    assert list(tmp_path.iterdir()) == []


def test_the_async_client_retries_the_same_way(stub):
    stub.script[("GET", "/v1/recipes/presets")] = [Reply(503, {"title": "busy"}), Reply(500, {"title": "oops"}),
                                                   Reply(200, PRESETS)]
    invalid = {"type": PROBLEM + "validation-error", "title": "Invalid", "status": 422}
    stub.script[("GET", "/v1/jobs/x")] = [Reply(422, invalid)]

    async def main():
        async with AsyncClient(stub.url, retry=FAST) as qf:
            presets = await qf.presets()
            with pytest.raises(QforgeError) as caught:
                await qf.get("x")
            return presets, caught.value

    presets, error = anyio.run(main)
    assert presets[0].name == "w4a16-rtn-g64" and error.slug == "validation-error"
    assert len(stub.requests("GET", "/v1/recipes/presets")) == 3 and len(stub.requests("GET", "/v1/jobs/x")) == 1


def test_retry_after_is_read_as_seconds_or_as_a_date():
    assert parse_retry_after("7") == 7.0
    later = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30), usegmt=True)
    assert 28 <= parse_retry_after(later) <= 30
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    policy = RetryPolicy(backoff_s=1.0, max_backoff_s=4.0)
    for retry, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)):
        assert ceiling / 2 <= policy.backoff(retry) <= ceiling  # equal jitter: at least half


def sse(*jobs: dict) -> Reply:
    text = "".join(f"event: status\nid: {i}\ndata: {json.dumps(job)}\n\n" for i, job in enumerate(jobs, 1))
    return Reply(200, (": ping\n\n" + text).encode(), {"Content-Type": "text/event-stream"})


def test_wait_reconnects_a_stream_that_ended_early_and_polls_a_server_without_one(stub):
    job_id = "ab" * 16
    running = {**job_json(job_id), "status": "running"}
    done = job_json(job_id, ArtifactInfo(url="/x", sha256="0" * 64, bytes=1))
    # a stream that ends while the job runs (a restarting server), then one that sees it finish
    stub.script[("GET", f"/v1/jobs/{job_id}/events")] = [sse(running), sse(done)]
    stub.script[("GET", f"/v1/jobs/{job_id}")] = [Reply(200, running)]
    seen = []
    with Client(stub.url, retry=FAST) as qf:
        assert qf.wait(job_id, timeout=30, progress=seen.append).status == "succeeded"
    assert [j.status for j in seen] == ["running", "running", "succeeded"]  # stream, the look between, stream
    assert len(stub.requests("GET", f"/v1/jobs/{job_id}/events")) == 2

    other = "cd" * 16
    stub.script[("GET", f"/v1/jobs/{other}")] = [Reply(200, {**running, "id": other}),
                                                 Reply(200, {**done, "id": other, "status": "failed", "error": "boom"})]
    with Client(stub.url, retry=FAST) as qf, pytest.raises(JobFailed) as caught:
        qf.wait(other, timeout=30, progress=False)  # no events route here: the default 404 not-found
    assert caught.value.reason == "boom" and len(stub.requests("GET", f"/v1/jobs/{other}/events")) == 1


def test_logs_reads_a_page_of_the_job_log_after_a_seq_and_is_retried_on_5xx(stub):
    page = {"items": [{"seq": 8, "at": "2026-12-02T10:00:00Z", "level": "error", "stage": "quantize",
                       "message": "failed: ValueError: bad group", "attempt": 1}], "next_after": 8}
    path = "/v1/jobs/" + "ab" * 16 + "/logs"
    stub.script[("GET", path)] = [Reply(503, {"title": "busy"}), Reply(200, page), Reply(200, page)]
    with Client(stub.url, retry=FAST) as qf:
        read = qf.logs("ab" * 16, after=7, limit=5)

    async def read_async():
        async with AsyncClient(stub.url, retry=FAST) as qf:
            return await qf.logs("ab" * 16, after=7)

    read_async_page = anyio.run(read_async)
    assert read == read_async_page and read.next_after == 8
    [line] = read.items
    assert (line.seq, line.level, line.stage, line.message) == (8, "error", "quantize", "failed: ValueError: bad group")
    assert [r["query"] for r in stub.requests("GET", path)] == ["after=7&limit=5", "after=7&limit=5", "after=7&limit=100"]
