"""A job's artifacts as the API serves them: which stored file a request means, the
response that streams it (Range requests included), signed download links, deletion and
the retention sweep. The files themselves are the artifact store's (app.artifact_store).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass

from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import jobs
from app.artifact_store import ArtifactStore, ArtifactStoreError, FolderStore, store_for
from app.core.config import Settings
from app.core.db import session_scope
from app.errors import Problem
from app.models import Job, JobStatus, utcnow

log = logging.getLogger(__name__)

# the names the worker gives archives: <job id>.tar, <job id>.<format>.tar
ARCHIVE_NAME = re.compile(r"^(?P<job>[0-9a-f]{32})(\.(?P<format>[a-z0-9_-]{1,32}))?\.tar$")
# an upload older than this that never completed is abandoned (a worker died during it)
ABANDONED_UPLOAD_AGE = dt.timedelta(days=1)


@dataclass(frozen=True)
class StoredArtifact:
    job_id: str
    format: str | None
    file: str  # its name in the artifact store
    sha256: str
    bytes: int

    @property
    def download_name(self) -> str:
        """qforge-<job id>.tar for the main artifact (however it was asked for), else
        qforge-<job id>-<format>.tar."""
        main = self.format is None or self.file == f"{self.job_id}.tar"
        return f"qforge-{self.job_id}.tar" if main else f"qforge-{self.job_id}-{self.format}.tar"


def job_artifacts(job: Job) -> list[StoredArtifact]:
    """The job's archives, the main one first (none before it succeeded or after deletion)."""
    if job.artifacts_deleted_at is not None or not (job.artifact_path and job.artifact_sha256):
        return []
    exported = [a for a in (job.report or {}).get("artifacts", []) if "file" in a]
    if not exported:  # a job from before multi-format export: the one archive
        return [StoredArtifact(job.id, None, job.artifact_path, job.artifact_sha256, job.artifact_bytes or 0)]
    return [StoredArtifact(job.id, a["format"], a["file"], a["sha256"], a["bytes"]) for a in exported]


def find_artifact(job: Job, format: str | None) -> StoredArtifact:
    """The artifact a download names, or the problem that says why there is none."""
    jobs.require_status(job, JobStatus.SUCCEEDED, "artifact")
    if job.artifacts_deleted_at is not None:
        why = "by request" if job.artifacts_deleted_reason == "request" else "when its retention period ended"
        detail = f"the artifacts of job {job.id} were deleted {why}, at {job.artifacts_deleted_at.isoformat()}"
        raise Problem(410, "artifact-deleted", "Artifact deleted", detail)
    stored = job_artifacts(job)
    if format is None:
        return stored[0]
    for artifact in stored:
        if artifact.format == format:
            return artifact
    choices = ", ".join(a.format for a in stored if a.format) or "none"
    detail = f"job {job.id} has no '{format}' artifact; its formats: {choices}"
    raise Problem(404, "artifact-format-not-exported", "No artifact in that format", detail)


def expires_at(job: Job, settings: Settings) -> dt.datetime | None:
    """When the retention sweep deletes the job's artifacts (None: kept until deleted)."""
    if settings.artifact_retention_days is None or job.finished_at is None or not job_artifacts(job):
        return None
    return job.finished_at + dt.timedelta(days=settings.artifact_retention_days)


# --------------------------------------------------------------------------------------
# downloads
# --------------------------------------------------------------------------------------
def store_unavailable(exc: Exception) -> Problem:
    """The 503 a request gets when the artifact store cannot serve it."""
    log.error("artifact store: %s", exc)
    return Problem(503, "artifact-store-unavailable", "Artifact store unavailable", str(exc))


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte of a single `Range: bytes=...` request; None to send the whole
    file (no header, or one this does not serve: several ranges, other units). Raises a 416
    problem for a range outside the file."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end or size == 0:
        raise Problem(416, "range-not-satisfiable", "Range not satisfiable",
                      f"the artifact has {size} bytes; the range asked for is '{header}'",
                      headers={"Content-Range": f"bytes */{size}"})
    return start, end


def artifact_response(store: ArtifactStore, artifact: StoredArtifact, range_header: str | None) -> Response:
    """The file, streamed in chunks, with `X-Checksum-SHA256`; a Range request gets its 206."""
    headers = {"X-Checksum-SHA256": artifact.sha256, "ETag": f'"{artifact.sha256}"'}
    gone = Problem(410, "artifact-gone", "Artifact gone",
                   f"the artifact of job {artifact.job_id} is no longer in the artifact store")
    if isinstance(store, FolderStore):
        path = store.path(artifact.file)
        if not path.is_file():
            raise gone
        byte_range(range_header, path.stat().st_size)  # an unsatisfiable range: our 416 problem, not Starlette's text
        # FileResponse streams the file and answers a satisfiable Range request (206) itself.
        return FileResponse(path, media_type="application/x-tar", filename=artifact.download_name, headers=headers)
    try:
        size = store.size(artifact.file)
        if size is None:
            raise gone
        span = byte_range(range_header, size)
        start, end = span if span is not None else (0, size - 1)
        chunks = store.read(artifact.file, start, end) if size else iter(())
    except ArtifactStoreError as exc:
        raise store_unavailable(exc) from None
    headers |= {
        "Accept-Ranges": "bytes",
        "Content-Length": str(end - start + 1 if size else 0),
        "Content-Disposition": f'attachment; filename="{artifact.download_name}"',
    }
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(chunks, status_code=206 if span else 200, media_type="application/x-tar", headers=headers)


# --------------------------------------------------------------------------------------
# signed links
# --------------------------------------------------------------------------------------
def signing_key(settings: Settings) -> bytes:
    """The key of the API's links: the configured one, else one made once for this data
    folder (so links survive a restart)."""
    if settings.signing_key is not None:
        return settings.signing_key.get_secret_value().encode()
    return key_file(settings, "signing.key")


def key_file(settings: Settings, name: str) -> bytes:
    """A random key kept in `<data_dir>/<name>`, made on first use, readable by its owner only."""
    path = settings.data_dir / name
    if not path.is_file():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f"{name}.{os.getpid()}.{secrets.token_hex(4)}")
        draft.write_bytes(secrets.token_bytes(32).hex().encode())
        draft.chmod(0o600)
        try:
            os.link(draft, path)  # whole or absent; another process's key wins a race
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_bytes().strip()


def _signature(key: bytes, file: str, expires: int) -> str:
    digest = hmac.new(key, f"{file}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def signed_link(settings: Settings, artifact: StoredArtifact, expires_in: int, base_url: str) -> tuple[str, dt.datetime]:
    """A download link anyone holding it may use until it expires: the object store's own
    when it has them (and artifact_links is 'store'), else one to this API."""
    now = utcnow()
    store = store_for(settings)
    if settings.artifact_links == "store":
        try:
            url = store.signed_url(artifact.file, expires_in, artifact.download_name)
        except ArtifactStoreError as exc:
            raise store_unavailable(exc) from None
        if url is not None:  # the store signs with its request time in whole seconds
            return url, now.replace(microsecond=0) + dt.timedelta(seconds=expires_in)
    # rounded up to the next whole second: rounding down would let a link asked to last one
    # second expire a few microseconds after it was issued
    whole_second = now.replace(microsecond=0) + dt.timedelta(seconds=1 if now.microsecond else 0)
    expires = whole_second + dt.timedelta(seconds=expires_in)
    stamp = int(expires.timestamp())
    signature = _signature(signing_key(settings), artifact.file, stamp)
    return f"{base_url.rstrip('/')}/v1/artifacts/{artifact.file}?expires={stamp}&signature={signature}", expires


def check_link(settings: Settings, file: str, expires: int, signature: str) -> None:
    """A 403 problem unless the link was signed here for this file and has not expired."""
    # compared as bytes: compare_digest refuses str with non-ASCII characters, and a link's
    # signature is whatever the caller sent
    expected = _signature(signing_key(settings), file, expires).encode()
    if not hmac.compare_digest(expected, signature.encode("utf-8", "surrogateescape")):
        raise Problem(403, "link-invalid", "Invalid link", "this download link was not issued by this service, or was altered")
    if utcnow().timestamp() > expires:
        when = dt.datetime.fromtimestamp(expires, dt.UTC).isoformat()
        raise Problem(403, "link-expired", "Link expired", f"this download link expired at {when}; ask for a new one")


def artifact_by_file(session: Session, file: str) -> StoredArtifact:
    """The artifact a signed link names (its file is `<job id>[.<format>].tar`)."""
    match = ARCHIVE_NAME.fullmatch(file)
    job = session.get(Job, match.group("job")) if match else None
    if job is None:
        raise Problem(404, "artifact-not-found", "No such artifact", f"no artifact named '{file}'")
    for artifact in job_artifacts(job):
        if artifact.file == file:
            return artifact
    find_artifact(job, None)  # raises the reason: deleted, not succeeded
    raise Problem(404, "artifact-not-found", "No such artifact", f"no artifact named '{file}'")


# --------------------------------------------------------------------------------------
# deletion and retention
# --------------------------------------------------------------------------------------
def delete_artifacts(session: Session, job: Job, store: ArtifactStore, reason: str) -> None:
    """Remove the job's files, then mark its artifacts deleted. Files go first: if the store
    fails halfway the row still lists them, and the next call (or sweep) finishes the job."""
    files = _all_names(job)
    for file in files:
        store.delete(file)
    if job.artifacts_deleted_at is None:
        job.artifacts_deleted_at, job.artifacts_deleted_reason = utcnow(), reason
        session.commit()
    log.info("job %s: artifacts deleted (%s): %s", job.id, reason, ", ".join(files))


def _all_names(job: Job) -> list[str]:
    """Every archive name the job's report or row mentions (after deletion job_artifacts is empty)."""
    names = {a["file"] for a in (job.report or {}).get("artifacts", []) if "file" in a}
    if job.artifact_path:
        names.add(job.artifact_path)
    return sorted(names)


def sweep_expired(settings: Settings, now: dt.datetime | None = None, batch: int = 200) -> int:
    """Delete the artifacts of jobs that finished more than the retention period ago, and
    the leftovers of uploads that never completed; returns how many jobs were swept."""
    store = store_for(settings)
    swept = 0
    if settings.artifact_retention_days is not None:
        cutoff = (now or utcnow()) - dt.timedelta(days=settings.artifact_retention_days)
        with session_scope() as session:
            query = (
                select(Job)
                .where(Job.status == JobStatus.SUCCEEDED, Job.finished_at < cutoff, Job.artifacts_deleted_at.is_(None))
                .order_by(Job.finished_at)
                .limit(batch)
            )
            for job in session.scalars(query).all():
                try:
                    delete_artifacts(session, job, store, "retention")
                    swept += 1
                except ArtifactStoreError:
                    log.exception("job %s: could not delete its expired artifacts; the next sweep tries again", job.id)
    abandoned = store.sweep_incomplete(ABANDONED_UPLOAD_AGE)
    if swept or abandoned:
        log.info("artifact sweep: %d jobs' artifacts past retention deleted, %d abandoned uploads removed", swept, abandoned)
    return swept

