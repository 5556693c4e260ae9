"""The artifact stores against their contract: the bytes put in come back, whole or by range,
and a file is visible whole or not at all. The S3 store runs against a real S3 API over HTTP
(moto's server), not a mock of boto3."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import httpx
import pytest

from app.artifact_store import PART_BYTES, ArtifactStoreError, FolderStore, S3Store


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path):
    if request.param == "folder":
        return FolderStore(tmp_path / "store")
    env = request.getfixturevalue("s3_env")
    bucket, _, prefix = env["QFORGE_ARTIFACT_URL"].removeprefix("s3://").partition("/")
    return S3Store(bucket, prefix + "/", env["QFORGE_S3_ENDPOINT_URL"], "us-east-1")


def _file(tmp_path: Path, payload: bytes, name: str = "upload.tar") -> Path:
    path = tmp_path / "work" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def test_put_read_ranges_replace_and_delete(store, tmp_path):
    store.prepare()
    payload = os.urandom(3 * (1 << 20) + 12345)  # several read chunks, and a ragged end
    source = _file(tmp_path, payload)
    store.put("job.tar", source)
    assert not source.exists()  # consumed
    assert store.size("job.tar") == len(payload)
    assert store.size("other.tar") is None
    assert b"".join(store.read("job.tar")) == payload
    assert b"".join(store.read("job.tar", 5, 5)) == payload[5:6]
    assert b"".join(store.read("job.tar", 1 << 20, (2 << 20) + 7)) == payload[1 << 20 : (2 << 20) + 8]
    assert b"".join(store.read("job.tar", len(payload) - 10)) == payload[-10:]

    store.put("job.tar", _file(tmp_path, b"second version"))
    assert b"".join(store.read("job.tar")) == b"second version"
    store.delete("job.tar")
    store.delete("job.tar")  # deleting what is gone is fine
    assert store.size("job.tar") is None


def test_a_multipart_upload_round_trips(s3_env, tmp_path):
    bucket, _, prefix = s3_env["QFORGE_ARTIFACT_URL"].removeprefix("s3://").partition("/")
    store = S3Store(bucket, prefix + "/", s3_env["QFORGE_S3_ENDPOINT_URL"], "us-east-1")
    payload = os.urandom(2 * PART_BYTES + 1000)  # three parts
    store.put("big.tar", _file(tmp_path, payload))
    assert store.size("big.tar") == len(payload)
    assert b"".join(store.read("big.tar", PART_BYTES - 3, PART_BYTES + 2)) == payload[PART_BYTES - 3 : PART_BYTES + 3]


def test_an_upload_that_fails_midway_leaves_nothing_visible(s3_env, tmp_path, monkeypatch):
    bucket, _, prefix = s3_env["QFORGE_ARTIFACT_URL"].removeprefix("s3://").partition("/")
    store = S3Store(bucket, prefix + "/", s3_env["QFORGE_S3_ENDPOINT_URL"], "us-east-1")
    real_upload = store.client.upload_part
    parts = []

    def flaky_upload_part(**kwargs):
        parts.append(kwargs["PartNumber"])
        if len(parts) == 2:
            raise ConnectionResetError("the network went away")
        return real_upload(**kwargs)

    monkeypatch.setattr(store.client, "upload_part", flaky_upload_part)
    with pytest.raises(ArtifactStoreError, match="upload s3://"):
        store.put("job.tar", _file(tmp_path, os.urandom(3 * PART_BYTES)))
    client = boto3.client("s3", endpoint_url=s3_env["QFORGE_S3_ENDPOINT_URL"], region_name="us-east-1")
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # aborted, no parts kept
    assert store.size("job.tar") is None


UPLOADER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from app.artifact_store import S3Store
    bucket, prefix, endpoint, path = sys.argv[1:]
    store = S3Store(bucket, prefix, endpoint, "us-east-1")
    real = store.client.upload_part
    def slow_upload_part(**kwargs):
        if kwargs["PartNumber"] > 1:
            time.sleep(60)  # killed here, with part 1 sent
        return real(**kwargs)
    store.client.upload_part = slow_upload_part
    store.put("job.tar", Path(path))
    """
)


def test_a_killed_uploader_leaves_nothing_visible_and_the_sweep_removes_its_parts(s3_env, tmp_path):
    bucket, _, prefix = s3_env["QFORGE_ARTIFACT_URL"].removeprefix("s3://").partition("/")
    endpoint = s3_env["QFORGE_S3_ENDPOINT_URL"]
    source = _file(tmp_path, os.urandom(3 * PART_BYTES))
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    uploader = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, bucket, prefix + "/", endpoint, str(source)],
        cwd=Path(__file__).parents[2], env=os.environ.copy(),
    )
    try:
        deadline = time.monotonic() + 60
        while not client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
            assert uploader.poll() is None, "the uploader ended before it started a multipart upload"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)  # part 1 on its way or stored
    finally:
        uploader.send_signal(signal.SIGKILL)
        uploader.wait()
    store = S3Store(bucket, prefix + "/", endpoint, "us-east-1")
    assert store.size("job.tar") is None
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    # (moto dates every multipart upload in 2010, so the age cut-off itself is not tested here)
    assert store.sweep_incomplete(dt.timedelta(hours=1)) == 1
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_presigned_links_download_without_credentials_for_their_lifetime(s3_env, tmp_path):
    bucket, _, prefix = s3_env["QFORGE_ARTIFACT_URL"].removeprefix("s3://").partition("/")
    public = s3_env["QFORGE_S3_ENDPOINT_URL"].replace("127.0.0.1", "localhost")
    store = S3Store(bucket, prefix + "/", s3_env["QFORGE_S3_ENDPOINT_URL"], "us-east-1", public_endpoint_url=public)
    store.put("job.tar", _file(tmp_path, b"artifact bytes"))
    url = store.signed_url("job.tar", 900, "qforge-job.tar")
    assert url.startswith(public + "/")  # signed for the address clients use
    query = httpx.URL(url).params
    assert query["X-Amz-Expires"] == "900" and query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    response = httpx.get(url)  # a plain client: no AWS credentials
    assert response.status_code == 200 and response.content == b"artifact bytes"
    assert response.headers["content-disposition"] == 'attachment; filename="qforge-job.tar"'


def test_a_missing_bucket_is_reported_then_created_by_prepare(s3_server, s3_env):
    store = S3Store("qforge-not-yet-created", "", s3_server, "us-east-1")
    with pytest.raises(ArtifactStoreError, match="does not exist"):
        store.check()
    store.prepare()
    store.check()


def test_an_unreachable_store_raises_a_readable_error(s3_env, closed_port):
    store = S3Store("bucket", "", f"http://127.0.0.1:{closed_port}", "us-east-1")
    with pytest.raises(ArtifactStoreError, match="could not reach bucket 'bucket'"):
        store.check()



def test_folder_store_sweeps_only_old_partial_files(tmp_path):
    store = FolderStore(tmp_path / "store")
    store.prepare()
    old, new = store.path("a.tar.partial"), store.path("b.tar.partial")
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    day_ago = time.time() - 2 * 86400
    os.utime(old, (day_ago, day_ago))
    assert store.sweep_incomplete(dt.timedelta(days=1)) == 1
    assert not old.exists() and new.exists()
