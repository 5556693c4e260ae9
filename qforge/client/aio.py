"""`AsyncClient`: the same calls as `Client`, for asyncio (or trio) code.

    async with AsyncClient("http://127.0.0.1:8000") as qf:
        job = await qf.submit("bundled:smollm2-135m", "w4a16-rtn-g64")
        job = await qf.wait(job.id, progress=False)

Request bodies, answers, retry decisions, event parsing and the download's part file are
`Client`'s (`_shared`, `retry`); only the waiting differs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
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


class AsyncClient:
    """See `Client`: the same arguments, the same methods, awaited."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = shared.server_url(base_url)
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=shared.request_headers(api_key), timeout=timeout, transport=transport
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool = True,
        per_attempt: Callable[[], contextlib.AbstractContextManager[dict]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        retry = 0
        while True:
            retry += 1
            try:
                with per_attempt() if per_attempt else contextlib.nullcontext({}) as extra:
                    response = await self._http.request(method, path, **kwargs, **extra)
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
            await anyio.sleep(delay)

    # ----------------------------------------------------------------------------------
    # jobs
    # ----------------------------------------------------------------------------------
    async def submit(
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
        body = shared.job_body(model, recipe, calibration, evaluation, export, seed, fields)
        key = idempotency_key or shared.new_idempotency_key()
        response = await self._send("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
        return JobOut.model_validate_json(response.content)

    async def get(self, job_id: str) -> JobOut:
        return JobOut.model_validate_json((await self._send("GET", shared.job_path(job_id))).content)

    async def report(self, job_id: str) -> dict[str, Any]:
        return (await self._send("GET", shared.job_path(job_id, "report"))).json()

    async def logs(self, job_id: str, after: int = 0, limit: int = 100) -> JobLogPage:
        params = {"after": after, "limit": limit}
        return JobLogPage.model_validate_json((await self._send("GET", shared.job_path(job_id, "logs"), params=params)).content)

    async def cancel(self, job_id: str) -> JobOut:
        return JobOut.model_validate_json((await self._send("POST", shared.job_path(job_id, "cancel"))).content)

    async def presets(self) -> list[Preset]:
        return [Preset.model_validate(p) for p in (await self._send("GET", "/v1/recipes/presets")).json()]

    async def wait(self, job_id: str, timeout: float | None = None, progress: bool | shared.JobCallback = True) -> JobOut:
        deadline = None if timeout is None else time.monotonic() + timeout
        show, close = shared.job_progress(progress, job_id)
        try:
            job = await self._follow(job_id, deadline, show)
        except shared.Expired as expired:
            raise WaitTimeout(expired.job or await self.get(job_id), timeout or 0.0) from None
        finally:
            close()
        return shared.finished(job)

    async def _follow(self, job_id: str, deadline: float | None, show: shared.JobCallback) -> JobOut:
        job, events, failures = None, True, 0
        while True:
            if events:
                try:
                    # closed on return too, so the stream's connection goes back at once
                    async with contextlib.aclosing(self._events(job_id, deadline)) as stream:
                        async for job in stream:
                            failures = 0
                            show(job)
                            if job.status.terminal:
                                return job
                except QforgeError as error:
                    if not shared.events_missing(error):
                        raise
                    events = False
                except httpx.TransportError as exc:
                    if remaining(deadline) == 0:
                        raise shared.Expired(job) from None
                    failures += 1
                    delay = self.retry.after_error(exc, failures)
                    if delay is None:
                        raise ServerUnavailable.after(f"{self.base_url}, events of job {job_id}", exc) from exc
                    await anyio.sleep(min(delay, remaining(deadline, delay)))
                    continue
            job = await self.get(job_id)
            show(job)
            if job.status.terminal:
                return job
            if remaining(deadline) == 0:
                raise shared.Expired(job)
            await anyio.sleep(min(shared.POLL_INTERVAL_S, remaining(deadline)))

    async def _events(self, job_id: str, deadline: float | None) -> AsyncIterator[JobOut]:
        read = min(shared.EVENT_READ_TIMEOUT_S, remaining(deadline, shared.EVENT_READ_TIMEOUT_S))
        timeout = httpx.Timeout(self.timeout, read=max(read, 0.01))
        headers = {"Accept": "text/event-stream"}
        async with self._http.stream("GET", shared.job_path(job_id, "events"), headers=headers, timeout=timeout) as response:
            if not response.is_success:
                await response.aread()
                raise error_from_response(response)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                raise QforgeError(404, "not-found", "No event stream", "the server answered without an event stream")
            parser = shared.EventParser()
            async for line in response.aiter_lines():
                if remaining(deadline) == 0:
                    raise shared.Expired(None)
                event = parser.feed(line)
                if event is not None and event[0] in ("status", "progress"):
                    yield JobOut.model_validate_json(event[1])

    async def download(
        self,
        job_id: str,
        dest: str | Path = ".",
        *,
        format: str | None = None,
        progress: bool | shared.BytesCallback = False,
    ) -> Path:
        job = await self.get(job_id)
        expected = shared.expected_artifact(job, format)
        target = shared.download_target(dest, job, format)
        show, close = shared.bytes_progress(progress, target.name)
        params = {"format": format} if format else None
        part, retry = None, 0
        try:
            if expected is not None:
                part = shared.PartFile(target, expected.sha256, expected.bytes)
                if part.resume_offset() == part.size:
                    part.open(part.size)
                    with contextlib.suppress(ChecksumMismatch):
                        return part.finish()
            while True:
                retry += 1
                offset = part.resume_offset() if part else 0
                headers = {"Range": f"bytes={offset}-", "If-Range": f'"{part.sha256}"'} if offset else {}
                try:
                    async with self._http.stream("GET", shared.job_path(job_id, "artifact"), params=params,
                                                 headers=headers) as response:
                        if not response.is_success:
                            await response.aread()
                            error = error_from_response(response)
                            delay = self.retry.after_response(response, retry)
                            if delay is None:
                                raise error
                            await anyio.sleep(delay)
                            continue
                        part = check_answer(response, part, target, expected)
                        part.open(answer_start(response, offset))
                        # written in the event loop's thread: a local write of one chunk is far
                        # shorter than the network read that brought it
                        async for chunk in response.aiter_bytes():
                            part.write(chunk)
                            show(part.written, part.size)
                    return part.finish()
                except httpx.TransportError as exc:
                    delay = self.retry.after_error(exc, retry)
                    if delay is None:
                        raise ServerUnavailable.after(f"{self.base_url}, artifact of job {job_id}", exc) from exc
                    await anyio.sleep(delay)
        finally:
            if part is not None:
                part.close()
            close()

    # ----------------------------------------------------------------------------------
    # uploads
    # ----------------------------------------------------------------------------------
    async def upload_model(self, path: str | Path, config: dict[str, Any], name: str | None = None) -> ModelOut:
        fields = {"config": json.dumps(config)} | ({"name": name} if name else {})
        return ModelOut.model_validate_json((await self._upload("/v1/models", Path(path), fields)).content)

    async def upload_dataset(self, path: str | Path, name: str | None = None) -> DatasetOut:
        fields = {"name": name} if name else {}
        return DatasetOut.model_validate_json((await self._upload("/v1/datasets", Path(path), fields)).content)

    async def _upload(self, route: str, path: Path, fields: dict[str, str]) -> httpx.Response:
        @contextlib.contextmanager
        def form() -> Iterator[dict]:
            with open(path, "rb") as fh:
                yield {"files": {"file": (path.name, fh, "application/octet-stream")}, "data": fields}

        return await self._send("POST", route, idempotent=False, per_attempt=form)

    async def list(self, status: JobStatus | str | None = None, limit: int = 20, offset: int = 0) -> JobPage:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status is not None:
            params["status"] = JobStatus(status).value
        return JobPage.model_validate_json((await self._send("GET", "/v1/jobs", params=params)).content)

