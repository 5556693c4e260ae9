"""What `Client` and `AsyncClient` share: request bodies, answers as the API's own models,
the event-stream parser, progress display and the download's part file. Only the I/O
(blocking or async) differs between the two clients."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from pydantic import BaseModel

from app.models import JobStatus
from app.schemas import ArtifactInfo, JobOut
from qforge.client.errors import ChecksumMismatch, JobCancelled, JobFailed, QforgeError

DEFAULT_SERVER = "http://127.0.0.1:8000"
POLL_INTERVAL_S = 1.0  # between GETs when the server has no event stream
# The server pings an event stream every 15 s; a stream silent for this long is dead.
EVENT_READ_TIMEOUT_S = 45.0
CHUNK_BYTES = 1 << 20

JobCallback = Callable[[JobOut], None]
BytesCallback = Callable[[int, int], None]  # (bytes so far, bytes in all)


def server_url(base_url: str | None) -> str:
    return (base_url or os.environ.get("QFORGE_SERVER") or DEFAULT_SERVER).rstrip("/")


def request_headers(api_key: str | None) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        agent = f"qforge-sdk/{version('qforge')}"
    except PackageNotFoundError:
        agent = "qforge-sdk"
    headers = {"User-Agent": agent, "Accept": "application/json, application/problem+json"}
    key = api_key if api_key is not None else os.environ.get("QFORGE_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def job_path(job_id: str, *rest: str) -> str:
    # quoted: an id is the caller's string, and must not be able to name another route
    return "/".join(["/v1/jobs", quote(job_id, safe=""), *rest])


def new_idempotency_key() -> str:
    return f"qforge-sdk-{uuid.uuid4().hex}"


def recipe_value(recipe: str | Path | dict[str, Any] | BaseModel) -> str | dict[str, Any]:
    """A recipe as the API takes it: a preset name or YAML/JSON text go as they are, a file
    (`Path`) is read, a pydantic Recipe is dumped."""
    if isinstance(recipe, Path):
        data = yaml.safe_load(recipe.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{recipe}: a recipe file holds a mapping with 'stages'")
        return data
    if isinstance(recipe, BaseModel):
        return recipe.model_dump(mode="json")
    return recipe


def job_body(model: str, recipe, calibration, evaluation, export, seed, fields: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, **fields}
    for name, value in (("calibration", calibration), ("evaluation", evaluation), ("export", export), ("seed", seed)):
        if value is not None:
            body[name] = value.model_dump(mode="json", exclude_unset=True) if isinstance(value, BaseModel) else value
    if recipe is not None:
        body["recipe"] = recipe_value(recipe)
    return body


def finished(job: JobOut) -> JobOut:
    """The job, if it succeeded; its failure or cancellation as an exception otherwise."""
    if job.status == JobStatus.FAILED:
        raise JobFailed(job)
    if job.status == JobStatus.CANCELLED:
        raise JobCancelled(job)
    return job


def events_missing(error: QforgeError) -> bool:
    """The server has no event stream (an older one): the route is unknown, not the job."""
    return error.status in (404, 405) and error.slug in ("not-found", "method-not-allowed")


class EventParser:
    """Server-sent events, line by line (the WHATWG format: `event:`, `data:`, `id:`, comments
    starting with ':', a blank line ending each event)."""

    def __init__(self) -> None:
        self._event, self._data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        """The (event, data) that this line completes, if any."""
        if not line:
            event, data = self._event, self._data
            self._event, self._data = "message", []
            return (event, "\n".join(data)) if data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


# --------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------
def job_progress(progress: bool | JobCallback | None, job_id: str) -> tuple[JobCallback, Callable[[], None]]:
    """(show, close): `progress` True draws a tqdm bar on stderr, a callable gets each job
    update (the caller owns whatever it draws), False shows nothing."""
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return lambda job: None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=100.0, desc=f"job {job_id[:8]}", unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def show(job: JobOut) -> None:
        stage = job.progress.stage or job.status.value
        step = f" {job.progress.current}/{job.progress.total}" if job.progress.total > 1 else ""
        bar.n = 100.0 if job.status == JobStatus.SUCCEEDED else job.progress.percent
        bar.set_postfix_str(f"{job.status.value}: {stage}{step}", refresh=False)
        bar.refresh()

    return show, bar.close


def bytes_progress(progress: bool | BytesCallback | None, name: str) -> tuple[BytesCallback, Callable[[], None]]:
    if callable(progress):
        return progress, lambda: None
    if not progress:
        return lambda done, total: None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(desc=name, unit="B", unit_scale=True, unit_divisor=1024)

    def show(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return show, bar.close


# --------------------------------------------------------------------------------------
# downloads
# --------------------------------------------------------------------------------------
def expected_artifact(job: JobOut, format: str | None) -> ArtifactInfo | None:
    """What the job says the download will be (its sha256 and size), if it has it yet."""
    if format is None:
        return job.artifact
    return next((a for a in job.artifacts if a.format == format), None)


def download_target(dest: str | Path, job: JobOut, format: str | None) -> Path:
    """`dest` itself, or inside `dest` when it is a folder: the name the API gives the file."""
    dest = Path(dest)
    if not (dest.is_dir() or str(dest).endswith(os.sep)):
        return dest
    main = format is None or (job.artifacts and job.artifacts[0].format == format)
    return dest / (f"qforge-{job.id}.tar" if main else f"qforge-{job.id}-{format}.tar")


def range_start(content_range: str | None) -> int:
    """The first byte of a 206 answer (`Content-Range: bytes 1000-4999/8000`)."""
    try:
        return int((content_range or "").split()[1].split("-")[0])
    except (IndexError, ValueError):
        raise QforgeError(206, "about:blank", "Bad range answer", f"unreadable Content-Range '{content_range}'") from None


class PartFile:
    """A download in progress: `<target>.<sha256 prefix>.part` beside the target, renamed to
    the target only once its sha256 is the one expected. The name carries the expected
    content's hash, so a part of another artifact is never resumed into this one."""

    def __init__(self, target: Path, sha256: str, size: int) -> None:
        self.target, self.sha256, self.size = target, sha256.lower(), size
        self.path = target.with_name(f"{target.name}.{self.sha256[:16]}.part")
        self.written = 0
        self._hash = hashlib.sha256()
        self._file = None

    def resume_offset(self) -> int:
        """Bytes already here from an earlier try (0: start afresh)."""
        self.close()  # flushed, so the size on disk is all that was written
        have = self.path.stat().st_size if self.path.is_file() else 0
        if have > self.size:
            self.path.unlink()
            return 0
        return have

    def open(self, offset: int) -> None:
        """Keep the first `offset` bytes (where the server's answer starts) and append after them."""
        self.close()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._hash = hashlib.sha256()
        with open(self.path, "a+b") as fh:  # hashes what is kept, so resuming needs no second pass
            fh.truncate(offset)
            fh.seek(0)
            while chunk := fh.read(CHUNK_BYTES):
                self._hash.update(chunk)
        self._file = open(self.path, "ab")
        self.written = offset

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.written += len(chunk)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> Path:
        """Check the sha256 and move the file into place; a mismatch deletes it."""
        self.close()
        actual = self._hash.hexdigest()
        if actual != self.sha256:
            self.path.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{self.target.name}: sha256 {actual} of the {self.written} bytes received, expected {self.sha256}; "
                "the partial file was deleted",
                expected=self.sha256,
                actual=actual,
            )
        os.replace(self.path, self.target)
        return self.target


def answer_start(response, offset: int) -> int:
    """Where the download answer's bytes start: `offset` for the 206 asked for, 0 for a whole
    file (the server ignored the Range, or the file changed: If-Range)."""
    if response.status_code != 206:
        return 0
    start = range_start(response.headers.get("content-range"))
    if start != offset:
        raise QforgeError(206, "about:blank", "Bad range answer", f"asked for bytes from {offset}, got from {start}")
    return start


def check_answer(response, part: PartFile | None, target: Path, expected: ArtifactInfo | None) -> PartFile:
    """The part file for this answer. The API's checksum header must agree with the job's;
    without the job's (the job finished after we looked), the header says what to expect."""
    checksum = response.headers.get("x-checksum-sha256", "").lower()
    if expected is not None and checksum and checksum != expected.sha256.lower():
        raise QforgeError(response.status_code, "about:blank", "Inconsistent checksum",
                          f"the download's X-Checksum-SHA256 {checksum} is not the job's artifact sha256 {expected.sha256}")
    if part is not None:
        return part
    if not checksum:
        raise QforgeError(response.status_code, "about:blank", "No checksum", "the download carries no X-Checksum-SHA256")
    return PartFile(target, checksum, int(response.headers.get("content-length", 0)))


class Expired(Exception):
    """A wait's deadline passed; carries the newest job seen, if any."""

    def __init__(self, job: JobOut | None) -> None:
        self.job = job


def remaining(deadline: float | None, default: float = float("inf")) -> float:
    """Seconds to a `time.monotonic()` deadline (never negative); `default` without one."""
    if deadline is None:
        return default
    return max(0.0, deadline - time.monotonic())
