"""`Client`: the qforge API from Python, blocking.

    from qforge.client import Client
    with Client("http://127.0.0.1:8000") as qf:
        job = qf.submit("bundled:smollm2-135m", "w4a16-rtn-g64", evaluation={"perplexity_tokens": 2048})
        job = qf.wait(job.id)                      # a progress bar; JobFailed if it failed
        print(qf.report(job.id)["metrics"])
        qf.download(job.id, "artifacts/")          # sha256 checked before the file appears
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from app.models import JobStatus
from app.schemas import DatasetOut, JobLogPage, JobOut, JobPage, ModelOut, Preset
from qforge.client import _shared as shared
from qforge.client._shared import answer_start, check_answer, remaining
from qforge.client.errors import (
    ChecksumMismatch,
    QforgeError,
    ServerUnavailable,
    WaitTimeout,
    error_from_response,
)
from qforge.client.retry import RetryPolicy

log = logging.getLogger("qforge.client")


class Client:
    """One connection pool to one server. `api_key` (default: `QFORGE_API_KEY`) is sent as
    `Authorization: Bearer <key>`; `base_url` defaults to `QFORGE_SERVER`, else the local
    server. `transport` replaces httpx's (tests, proxies)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = shared.server_url(base_url)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.base_url, headers=shared.request_headers(api_key), timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----------------------------------------------------------------------------------
    # one request, retried
    # ----------------------------------------------------------------------------------
    def _send(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool = True,
        per_attempt: Callable[[], contextlib.AbstractContextManager[dict]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send until an answer is a success or is not worth retrying (`RetryPolicy`);
        `per_attempt` gives fresh arguments for each try (an upload reopens its file)."""
        retry = 0
        while True:
            retry += 1
            try:
                with per_attempt() if per_attempt else contextlib.nullcontext({}) as extra:
                    response = self._http.request(method, path, **kwargs, **extra)
            except httpx.TransportError as exc:
                delay = self.retry.after_error(exc, retry, idempotent)
                if delay is None:
                    raise ServerUnavailable.after(f"{method} {self.base_url}{path}", exc) from exc
                log.info("%s %s: %s; retry %d in %.2f s", method, path, type(exc).__name__, retry, delay)
            else:
                if response.is_success:
                    return response
                error = error_from_response(response)
                delay = self.retry.after_response(response, retry, idempotent)
                if delay is None:
                    raise error
                log.info("%s %s: %s; retry %d in %.2f s", method, path, response.status_code, retry, delay)
            time.sleep(delay)

    # ----------------------------------------------------------------------------------
    # jobs
    # ----------------------------------------------------------------------------------
    def submit(
        self,
        model: str,
        recipe: str | Path | dict[str, Any] | Any = None,
        *,
        calibration: dict[str, Any] | Any = None,
        evaluation: dict[str, Any] | Any = None,
        export: list[str] | None = None,
        seed: int | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> JobOut:
        """Submit a job; `recipe` is a preset name, YAML/JSON text, a file (`Path`), a dict or
        a quantcore Recipe. Other job fields (a classic job's `kind`, `data`, `qat`, ...) go in
        `fields`. One idempotency key is used for every retry of this call (a fresh one unless
        given), so a retried submit never makes a second job."""
        body = shared.job_body(model, recipe, calibration, evaluation, export, seed, fields)
        key = idempotency_key or shared.new_idempotency_key()
        # a 503 broker-unavailable is retried too: the server released the key of the job it
        # could not queue, so the retry queues the job once the broker is back
        response = self._send("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
        return JobOut.model_validate_json(response.content)

    def get(self, job_id: str) -> JobOut:
        return JobOut.model_validate_json(self._send("GET", shared.job_path(job_id)).content)

    def report(self, job_id: str) -> dict[str, Any]:
        """The report of a succeeded job (metrics before and after, sizes, per-layer table)."""
        return self._send("GET", shared.job_path(job_id, "report")).json()

    def logs(self, job_id: str, after: int = 0, limit: int = 100) -> JobLogPage:
        """The job's log lines after the line `after`, oldest first; pass the page's
        `next_after` for the lines written since."""
        params = {"after": after, "limit": limit}
        return JobLogPage.model_validate_json(self._send("GET", shared.job_path(job_id, "logs"), params=params).content)

    def cancel(self, job_id: str) -> JobOut:
        """A queued job is cancelled at once; a running one stops within about a second
        (`cancel_requested` is set meanwhile). A job that succeeded or failed is a 409 `job-finished`; a cancelled one answers again."""
        return JobOut.model_validate_json(self._send("POST", shared.job_path(job_id, "cancel")).content)

    def presets(self) -> list[Preset]:
        return [Preset.model_validate(p) for p in self._send("GET", "/v1/recipes/presets").json()]

    def wait(self, job_id: str, timeout: float | None = None, progress: bool | shared.JobCallback = True) -> JobOut:
        """Follow the job until it finishes and return it. `progress`: True for a tqdm bar,
        a callable to receive each update, False for nothing. Raises `JobFailed` (with the
        reason), `JobCancelled`, or `WaitTimeout` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        show, close = shared.job_progress(progress, job_id)
        try:
            job = self._follow(job_id, deadline, show)
        except shared.Expired as expired:
            raise WaitTimeout(expired.job or self.get(job_id), timeout or 0.0) from None
        finally:
            close()
        return shared.finished(job)

    def _follow(self, job_id: str, deadline: float | None, show: shared.JobCallback) -> JobOut:
        job, events, failures = None, True, 0
        while True:
            if events:
                try:
                    # closed on return too, so the stream's connection goes back at once
                    with contextlib.closing(self._events(job_id, deadline)) as stream:
                        for job in stream:
                            failures = 0
                            show(job)
                            if job.status.terminal:
                                return job
                except QforgeError as error:
                    if not shared.events_missing(error):
                        raise
                    events = False  # an older server: poll instead
                except httpx.TransportError as exc:
                    if remaining(deadline) == 0:
                        raise shared.Expired(job) from None
                    failures += 1
                    delay = self.retry.after_error(exc, failures)
                    if delay is None:
                        raise ServerUnavailable.after(f"{self.base_url}, events of job {job_id}", exc) from exc
                    time.sleep(min(delay, remaining(deadline, delay)))
                    continue
            # the stream ended early (a restarting server), or there is none: look, then go on
            job = self.get(job_id)
            show(job)
            if job.status.terminal:
                return job
            if remaining(deadline) == 0:
                raise shared.Expired(job)
            time.sleep(min(shared.POLL_INTERVAL_S, remaining(deadline)))

    def _events(self, job_id: str, deadline: float | None) -> Iterator[JobOut]:
        read = min(shared.EVENT_READ_TIMEOUT_S, remaining(deadline, shared.EVENT_READ_TIMEOUT_S))
        timeout = httpx.Timeout(self.timeout, read=max(read, 0.01))
        headers = {"Accept": "text/event-stream"}
        with self._http.stream("GET", shared.job_path(job_id, "events"), headers=headers, timeout=timeout) as response:
            if not response.is_success:
                response.read()
                raise error_from_response(response)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise QforgeError(404, "not-found", "No event stream", "the server answered without an event stream")
            parser = shared.EventParser()
            for line in response.iter_lines():
                if remaining(deadline) == 0:
                    raise shared.Expired(None)
                event = parser.feed(line)
                if event is not None and event[0] in ("status", "progress"):
                    yield JobOut.model_validate_json(event[1])

    def download(
        self,
        job_id: str,
        dest: str | Path = ".",
        *,
        format: str | None = None,
        progress: bool | shared.BytesCallback = False,
    ) -> Path:
        """Stream the job's artifact (`format`: another exported one) to `dest`, a file or a
        folder; returns the file. The bytes go to a `.part` file that becomes `dest` only once
        its sha256 matches the API's; a broken transfer resumes where it stopped (Range),
        on this call's retries and on a later call."""
        job = self.get(job_id)
        expected = shared.expected_artifact(job, format)
        target = shared.download_target(dest, job, format)
        show, close = shared.bytes_progress(progress, target.name)
        params = {"format": format} if format else None
        part, retry = None, 0
        try:
            if expected is not None:
                part = shared.PartFile(target, expected.sha256, expected.bytes)
                if part.resume_offset() == part.size:  # all here from an earlier call
                    part.open(part.size)
                    with contextlib.suppress(ChecksumMismatch):
                        return part.finish()
            while True:
                retry += 1
                offset = part.resume_offset() if part else 0
                headers = {"Range": f"bytes={offset}-", "If-Range": f'"{part.sha256}"'} if offset else {}
                try:
                    url = shared.job_path(job_id, "artifact")
                    with self._http.stream("GET", url, params=params, headers=headers) as response:
                        if not response.is_success:
                            response.read()
                            error = error_from_response(response)
                            delay = self.retry.after_response(response, retry)
                            if delay is None:
                                raise error
                            time.sleep(delay)
                            continue
                        part = check_answer(response, part, target, expected)
                        part.open(answer_start(response, offset))
                        for chunk in response.iter_bytes():
                            part.write(chunk)
                            show(part.written, part.size)
                    return part.finish()
                except httpx.TransportError as exc:
                    delay = self.retry.after_error(exc, retry)
                    if delay is None:
                        raise ServerUnavailable.after(f"{self.base_url}, artifact of job {job_id}", exc) from exc
                    log.info("download of job %s broke at %d bytes (%s); resuming in %.2f s",
                             job_id, part.written if part else 0, type(exc).__name__, delay)
                    time.sleep(delay)
        finally:
            if part is not None:
                part.close()
            close()

    # ----------------------------------------------------------------------------------
    # uploads
    # ----------------------------------------------------------------------------------
    def upload_model(self, path: str | Path, config: dict[str, Any], name: str | None = None) -> ModelOut:
        """Upload a .safetensors checkpoint; `config` names its architecture and arguments,
        e.g. {"architecture": "digits-cnn", "width": 16}. Use it as `model="upload:<id>"`."""
        fields = {"config": json.dumps(config)} | ({"name": name} if name else {})
        return ModelOut.model_validate_json(self._upload("/v1/models", Path(path), fields).content)

    def upload_dataset(self, path: str | Path, name: str | None = None) -> DatasetOut:
        """Upload calibration, training or evaluation data (.npz or .jsonl)."""
        fields = {"name": name} if name else {}
        return DatasetOut.model_validate_json(self._upload("/v1/datasets", Path(path), fields).content)

    def _upload(self, route: str, path: Path, fields: dict[str, str]) -> httpx.Response:
        @contextlib.contextmanager
        def form() -> Iterator[dict]:
            with open(path, "rb") as fh:  # streamed by httpx, reopened for each try
                yield {"files": {"file": (path.name, fh, "application/octet-stream")}, "data": fields}

        # not idempotent: a retry after the server may have stored it would store it twice
        return self._send("POST", route, idempotent=False, per_attempt=form)

    def list(self, status: JobStatus | str | None = None, limit: int = 20, offset: int = 0) -> JobPage:
        """A page of jobs, newest first; `total` counts them over all pages."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status is not None:
            params["status"] = JobStatus(status).value
        return JobPage.model_validate_json(self._send("GET", "/v1/jobs", params=params).content)


