"""Where finished artifacts are kept: a local folder (the embedded default) or an
S3-compatible object store (AWS S3, MinIO, Ceph), chosen by `Settings.artifact_url`.

An artifact is never visible half-written. The folder store receives a finished file by a
rename; the S3 store uploads in parts, and only the request that completes the upload makes
the object exist: an upload that fails is aborted, and one whose process died is left as an
incomplete multipart upload that no reader can see and `sweep_incomplete` aborts later.

Files move in chunks both ways: nothing reads a whole artifact into memory.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.core.config import Settings

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Multipart: parts of 16 MiB, 4 in flight: an upload holds at most ~64 MiB of the file in memory.
PART_BYTES = 16 << 20
UPLOAD_CONCURRENCY = 4


class ArtifactStoreError(RuntimeError):
    """The store could not be reached or refused the request (credentials, bucket, network)."""


class ArtifactStore(ABC):
    """Files by name (`<job id>.tar`, `<job id>.<format>.tar`), flat."""

    @abstractmethod
    def put(self, name: str, source: Path) -> None:
        """Store a finished local file under `name`, replacing any earlier one; `source` is
        consumed (moved or deleted). Readers see the whole file or nothing."""

    @abstractmethod
    def size(self, name: str) -> int | None:
        """The stored file's bytes, or None when there is no such file."""

    @abstractmethod
    def read(self, name: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes start..end (inclusive; end None: to the last byte), in chunks. The file
        is opened before this returns, so a missing file or an unreachable store raises here,
        not once a response has started."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the file; a missing one is not an error."""

    def signed_url(self, name: str, expires_in: int, filename: str) -> str | None:
        """A link that downloads the file without credentials until it expires, served by
        the store itself; None when the store has no such links (the API signs its own)."""
        return None

    def sweep_incomplete(self, older_than: dt.timedelta) -> int:
        """Remove the leftovers of uploads that never finished; returns how many."""
        return 0

    def check(self) -> None:
        """Raise ArtifactStoreError when the store cannot be used (the readiness probe)."""

    def prepare(self) -> None:
        """Make the store ready to receive artifacts (when a worker starts); raise
        ArtifactStoreError when it cannot be used."""
        self.check()


class FolderStore(ArtifactStore):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __repr__(self) -> str:
        return f"FolderStore({str(self.folder)!r})"

    def path(self, name: str) -> Path:
        return self.folder / name

    def put(self, name: str, source: Path) -> None:
        dest = self.path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, dest)  # the worker's work folder lives under this folder: a rename
        except OSError:
            # another filesystem: copy beside the destination, then rename, so that it is atomic
            partial = dest.with_name(dest.name + ".partial")
            shutil.copyfile(source, partial)
            os.replace(partial, dest)
            source.unlink()

    def size(self, name: str) -> int | None:
        path = self.path(name)
        return path.stat().st_size if path.is_file() else None

    def read(self, name: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        file = open(self.path(name), "rb")  # noqa: SIM115 (closed by the generator)
        file.seek(start)
        return _file_chunks(file, None if end is None else end - start + 1)

    def delete(self, name: str) -> None:
        for path in (self.path(name), self.path(name + ".partial")):
            path.unlink(missing_ok=True)

    def sweep_incomplete(self, older_than: dt.timedelta) -> int:
        cutoff = dt.datetime.now().timestamp() - older_than.total_seconds()
        removed = 0
        for partial in self.folder.glob("*.partial"):
            if partial.stat().st_mtime < cutoff:
                partial.unlink(missing_ok=True)
                removed += 1
        return removed

    def check(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _store_error(f"create the artifact folder {self.folder}", exc) from exc
        if not os.access(self.folder, os.W_OK):
            raise ArtifactStoreError(f"the artifact folder {self.folder} is not writable")


class S3Store(ArtifactStore):
    """Objects `<prefix><name>` in one bucket. Credentials come from boto3's usual chain
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 public_endpoint_url: str | None = None) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.region = region
        self.client = self._client(endpoint_url, region)
        # Signed links name the host they are for: sign them for the address clients use.
        self.link_client = self._client(public_endpoint_url, region) if public_endpoint_url else self.client

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    @staticmethod
    def _client(endpoint_url: str | None, region: str | None) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"},
                        connect_timeout=10, read_timeout=60)
        return boto3.client("s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config)

    def key(self, name: str) -> str:
        return self.prefix + name

    def _errors(self, action: str, name: str = "") -> _S3Errors:
        return _S3Errors(f"{action} s3://{self.bucket}/{self.key(name)}")

    def put(self, name: str, source: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                                max_concurrency=UPLOAD_CONCURRENCY)
        with self._errors("upload", name):
            # s3transfer aborts the multipart upload when a part fails: nothing is left visible
            self.client.upload_file(str(source), self.bucket, self.key(name), Config=config,
                                    ExtraArgs={"ContentType": "application/x-tar"})
        source.unlink()

    def size(self, name: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.key(name))["ContentLength"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise _store_error(f"look up s3://{self.bucket}/{self.key(name)}", exc) from exc
        except Exception as exc:  # the network, credentials: botocore's other errors
            raise _store_error(f"look up s3://{self.bucket}/{self.key(name)}", exc) from exc

    def read(self, name: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        byte_range = f"bytes={start}-{'' if end is None else end}"
        with self._errors("read", name):
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(name), Range=byte_range)["Body"]
        return _body_chunks(body)

    def delete(self, name: str) -> None:
        with self._errors("delete", name):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(name))

    def signed_url(self, name: str, expires_in: int, filename: str) -> str | None:
        params = {"Bucket": self.bucket, "Key": self.key(name),
                  "ResponseContentDisposition": f'attachment; filename="{filename}"'}
        return self.link_client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in)

    def sweep_incomplete(self, older_than: dt.timedelta) -> int:
        cutoff = dt.datetime.now(dt.UTC) - older_than
        aborted = 0
        with self._errors("list the unfinished uploads of"):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < cutoff:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                        aborted += 1
        return aborted

    def _bucket_exists(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise _store_error(f"reach bucket '{self.bucket}'", exc) from exc
        except Exception as exc:
            raise _store_error(f"reach bucket '{self.bucket}'", exc) from exc

    def check(self) -> None:
        if not self._bucket_exists():
            raise ArtifactStoreError(f"bucket '{self.bucket}' does not exist (a worker creates it when it starts)")

    def prepare(self) -> None:
        """A missing bucket is created: a fresh MinIO has none."""
        if self._bucket_exists():
            return
        with self._errors("create bucket"):
            extra = {}
            if self.region and self.region != "us-east-1":
                extra["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            self.client.create_bucket(Bucket=self.bucket, **extra)
        log.info("created bucket '%s' for the artifacts", self.bucket)


def _file_chunks(file: Any, left: int | None) -> Iterator[bytes]:
    with file:
        while left is None or left > 0:
            chunk = file.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk


def _body_chunks(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK_BYTES)
    finally:
        body.close()


def _store_error(action: str, exc: BaseException) -> ArtifactStoreError:
    return ArtifactStoreError(f"could not {action}: {type(exc).__name__}: {exc}")


class _S3Errors:
    """Turns boto's exceptions into ArtifactStoreError naming what was being done."""

    def __init__(self, action: str) -> None:
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, ArtifactStoreError) and isinstance(exc, Exception):
            raise _store_error(self.action, exc) from exc
        return False


def open_store(settings: Settings) -> ArtifactStore:
    if not settings.artifact_url:
        return FolderStore(settings.artifact_dir)
    bucket, _, prefix = settings.artifact_url.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    return S3Store(bucket, prefix + "/" if prefix else "", settings.s3_endpoint_url, settings.s3_region,
                   settings.s3_public_endpoint_url)


_stores: dict[tuple, ArtifactStore] = {}


def store_for(settings: Settings) -> ArtifactStore:
    """The store of these settings, made once per process (an S3 client is slow to build)."""
    key = (settings.artifact_url, str(settings.artifact_dir), settings.s3_endpoint_url, settings.s3_region,
           settings.s3_public_endpoint_url)
    if key not in _stores:
        _stores[key] = open_store(settings)
    return _stores[key]


def forget_stores() -> None:
    """Drop the stores made so far: a forked process must not share its parent's connections."""
    _stores.clear()
