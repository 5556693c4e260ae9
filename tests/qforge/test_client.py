"""The SDK against a live `qforge serve`: submit → wait → report → download (sha256 checked
by the test itself), resuming a partial download, idempotent submits, timeouts,
cancellation, a failed job, problem+json errors, uploads, and the async client."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
import uuid

import anyio
import httpx
import pytest
import torch
from safetensors.torch import save_file

from app.errors import PROBLEM_BASE
from qforge.client import (
    AsyncClient,
    ChecksumMismatch,
    Client,
    JobCancelled,
    JobFailed,
    QforgeError,
    WaitTimeout,
)
from quantcore.job import STAGES
from quantcore.recipe import PRESETS, preset
from tests.e2e.conftest import TEST_API_KEY

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}  # for the raw httpx calls beside the SDK

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def qf(live_server):
    with Client(live_server) as client:
        yield client


@pytest.fixture(scope="module")
def finished(qf, fast_job):
    """One job submitted and followed to the end, with every update `wait` passed on."""
    submitted = qf.submit(**fast_job)
    updates = []
    job = qf.wait(submitted.id, timeout=600, progress=updates.append)
    return submitted, job, updates


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_submit_wait_report_download(qf, live_server, finished, tmp_path):
    submitted, job, updates = finished
    assert submitted.status == "queued" and job.id == submitted.id and job.status == "succeeded"
    percents = [u.progress.percent for u in updates]
    assert percents == sorted(percents) and percents[-1] == 100.0, percents
    stages = [u.progress.stage for u in updates if u.progress.stage]
    assert {"load", "quantize", "evaluate", "export"} <= set(stages)
    assert [STAGES.index(s) for s in stages] == sorted(STAGES.index(s) for s in stages)

    report = qf.report(job.id)
    baseline, quantized = report["metrics"]["baseline"]["perplexity"], report["metrics"]["quantized"]["perplexity"]
    assert 5 < baseline < quantized < 2 * baseline
    assert report["request"]["evaluation"]["perplexity_tokens"] == 512

    path = qf.download(job.id, tmp_path)
    assert path == tmp_path / f"qforge-{job.id}.tar" and sorted(tmp_path.iterdir()) == [path]  # no .part left
    data = path.read_bytes()
    with httpx.stream("GET", f"{live_server}/v1/jobs/{job.id}/artifact", headers=AUTH) as response:
        header = response.headers["x-checksum-sha256"]
    assert sha256(data) == job.artifact.sha256 == header and len(data) == job.artifact.bytes
    with tarfile.open(path) as tar:
        inside = json.load(tar.extractfile("artifact/report.json"))
    assert inside["metrics"] == report["metrics"]


class Recording(httpx.HTTPTransport):
    """httpx's transport, noting each request's headers and the status it got."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, dict, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.seen.append((request.url.path, dict(request.headers), response.status_code))
        return response


def test_a_partial_download_is_resumed_and_a_corrupt_one_is_refused(live_server, finished, tmp_path):
    _, job, _ = finished
    target = tmp_path / "model.tar"
    part = tmp_path / f"model.tar.{job.artifact.sha256[:16]}.part"
    whole = httpx.get(f"{live_server}/v1/jobs/{job.id}/artifact", headers=AUTH).content
    part.write_bytes(whole[:1_000_000])  # as an interrupted download leaves it
    transport = Recording()
    with Client(live_server, transport=transport) as client:
        assert client.download(job.id, target) == target
    assert target.read_bytes() == whole and not part.exists()
    artifact_requests = [(headers, status) for path, headers, status in transport.seen if path.endswith("/artifact")]
    assert [(h.get("range"), status) for h, status in artifact_requests] == [("bytes=1000000-", 206)]

    target.unlink()
    part.write_bytes(b"\0" * 1_000_000)  # wrong bytes: only the checksum can tell
    with Client(live_server) as client, pytest.raises(ChecksumMismatch) as caught:
        client.download(job.id, target)
    assert caught.value.expected == job.artifact.sha256 and caught.value.actual != job.artifact.sha256
    assert list(tmp_path.iterdir()) == []


def test_the_same_idempotency_key_is_the_same_job_and_a_wait_can_time_out_and_a_job_be_cancelled(qf, fast_job):
    key = f"test-{uuid.uuid4().hex}"
    body = {**fast_job, "recipe": "w8a16-rtn"}
    first = qf.submit(**body, idempotency_key=key)
    again = qf.submit(**body, idempotency_key=key)
    assert again.id == first.id
    assert [j.id for j in qf.list(limit=100).items].count(first.id) == 1
    with pytest.raises(QforgeError) as caught:
        qf.submit(**{**body, "recipe": "w4a16-rtn"}, idempotency_key=key)
    assert (caught.value.status, caught.value.slug) == (422, "idempotency-key-reused")
    assert caught.value.problem["job_id"] == first.id

    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timed_out:
        qf.wait(first.id, timeout=1, progress=False)
    assert time.monotonic() - started < 10 and not timed_out.value.job.status.terminal

    answer = qf.cancel(first.id)
    assert answer.status == "cancelled" or answer.cancel_requested
    with pytest.raises(JobCancelled) as cancelled:
        qf.wait(first.id, timeout=300, progress=False)
    assert cancelled.value.job.status == "cancelled"
    assert qf.cancel(first.id).status == "cancelled"  # cancelling again (a lost answer retried) is no error
    with pytest.raises(QforgeError) as no_report:
        qf.report(first.id)
    assert (no_report.value.status, no_report.value.slug) == (409, "job-not-succeeded")


def test_a_failed_job_raises_JobFailed_with_the_reason(qf, fast_job):
    weights = {"type": "int", "bits": 4, "symmetric": True, "granularity": "group", "group_size": 7}
    recipe = {"name": "g7", "stages": [{"algorithm": "rtn", "weights": weights}]}
    job = qf.submit(fast_job["model"], recipe, evaluation={"perplexity_tokens": 512})
    with pytest.raises(JobFailed) as caught:
        qf.wait(job.id, timeout=300, progress=False)
    assert "group_size 7" in caught.value.reason and caught.value.job.status == "failed"
    assert caught.value.reason in str(caught.value)


def test_api_errors_are_QforgeError_with_the_problem_type(qf, fast_job):
    with pytest.raises(QforgeError) as bad_preset:
        qf.submit(fast_job["model"], "w4a16-no-such-preset")
    error = bad_preset.value
    assert (error.status, error.type, error.title) == (422, PROBLEM_BASE + "validation-error", "Invalid request")
    assert "unknown preset 'w4a16-no-such-preset'" in error.detail and error.problem["errors"]
    with pytest.raises(QforgeError) as missing:
        qf.get("0" * 32)
    assert (missing.value.status, missing.value.type) == (404, PROBLEM_BASE + "job-not-found")


def test_presets_are_quantcores(qf):
    presets = qf.presets()
    assert [p.name for p in presets] == list(PRESETS)
    assert all(p.recipe == preset(p.name).model_dump(mode="json") for p in presets)


def test_uploads_return_what_the_server_stored(qf, tmp_path):
    data = tmp_path / "calibration.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the calibration text"}) + "\n" for i in range(40)))
    dataset = qf.upload_dataset(data, name="my text")
    assert (dataset.name, dataset.kind, dataset.samples) == ("my text", "text", 40)
    assert dataset.sha256 == sha256(data.read_bytes()) and dataset.bytes == data.stat().st_size

    torch.manual_seed(0)
    weights = tmp_path / "cnn.safetensors"
    state = {"w": torch.randn(8, 8), "b": torch.zeros(8)}
    save_file(state, str(weights))
    model = qf.upload_model(weights, {"architecture": "digits-cnn", "width": 4})
    assert model.sha256 == sha256(weights.read_bytes()) and model.tensors == 2 and model.parameters == 72
    assert model.architecture == "digits-cnn" and model.name == "cnn.safetensors"

    pickled = tmp_path / "model.pt"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    pickled.write_bytes(buffer.getvalue())
    with pytest.raises(QforgeError) as refused:
        qf.upload_model(pickled, {"architecture": "digits-cnn"})
    assert (refused.value.status, refused.value.slug) == (415, "unsafe-model-format")


def test_the_async_client(live_server, finished, fast_job, tmp_path, capsys):
    _, job, _ = finished

    async def main():
        async with AsyncClient(live_server) as client:
            again = await client.wait(job.id, progress=True)  # finished already: at once
            report = await client.report(job.id)
            page = await client.list(status="succeeded", limit=100)
            path = await client.download(job.id, tmp_path)
            queued = await client.submit(**fast_job)
            cancelled = await client.cancel(queued.id)
            return again, report, page, path, cancelled

    again, report, page, path, cancelled = anyio.run(main)
    assert again.status == "succeeded" and "100%" in capsys.readouterr().err  # the tqdm bar, on stderr
    assert report["metrics"]["quantized"]["perplexity"] > 0
    assert job.id in [j.id for j in page.items] and all(j.status == "succeeded" for j in page.items)
    assert sha256(path.read_bytes()) == job.artifact.sha256
    assert cancelled.status == "cancelled" or cancelled.cancel_requested
