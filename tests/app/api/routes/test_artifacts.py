"""Artifact downloads, signed links, deletion and retention, through the API, with the
artifacts in the local folder and in an S3 bucket (a real S3 API over HTTP)."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time

import httpx
import pytest

from app.artifact_store import store_for
from app.models import JobStatus, utcnow

PROBLEM = "https://qforge.dev/problems/"


@pytest.fixture(params=["folder", "s3"])
def service_env(request) -> dict[str, str]:
    return request.getfixturevalue("s3_env") if request.param == "s3" else {}


@pytest.fixture
def finished_job(submit, set_job, settings, tmp_path):
    """A succeeded job with two stored artifacts; returns (job id, {format: payload})."""

    def make(finished_at: dt.datetime | None = None) -> tuple[str, dict[str, bytes]]:
        job_id = submit().json()["id"]
        payloads = {"qforge": os.urandom(300_000), "gguf": os.urandom(70_001)}
        entries, store = [], store_for(settings)
        for index, (fmt, payload) in enumerate(payloads.items()):
            name = f"{job_id}.tar" if index == 0 else f"{job_id}.{fmt}.tar"
            staged = tmp_path / "staged" / name
            staged.parent.mkdir(exist_ok=True)
            staged.write_bytes(payload)
            store.put(name, staged)
            entries.append({"format": fmt, "folder": "x", "file": name,
                            "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)})
        set_job(job_id, status=JobStatus.SUCCEEDED, finished_at=finished_at or utcnow(), report={"artifacts": entries},
                artifact_path=entries[0]["file"], artifact_sha256=entries[0]["sha256"], artifact_bytes=entries[0]["bytes"])
        return job_id, payloads

    return make


def test_downloads_whole_and_by_range(client, finished_job):
    job_id, payloads = finished_job()
    data = payloads["gguf"]
    url = f"/v1/jobs/{job_id}/artifact?format=gguf"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["x-checksum-sha256"] == hashlib.sha256(data).hexdigest()
    assert whole.headers["content-length"] == str(len(data))
    assert f'filename="qforge-{job_id}-gguf.tar"' in whole.headers["content-disposition"]
    assert client.get(f"/v1/jobs/{job_id}/artifact").content == payloads["qforge"]

    cases = {"bytes=100-1123": (100, 1123), "bytes=70000-": (70000, len(data) - 1), "bytes=-10": (len(data) - 10, len(data) - 1),
             "bytes=69990-99999999": (69990, len(data) - 1)}
    for header, (first, last) in cases.items():
        part = client.get(url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.content == data[first : last + 1], header
        assert part.headers["content-range"] == f"bytes {first}-{last}/{len(data)}"
    beyond = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"


def test_a_resumed_download_reassembles_the_file(client, finished_job):
    job_id, payloads = finished_job()
    first = client.get(f"/v1/jobs/{job_id}/artifact", headers={"Range": "bytes=0-99999"}).content
    rest = client.get(f"/v1/jobs/{job_id}/artifact", headers={"Range": f"bytes={len(first)}-"}).content
    assert hashlib.sha256(first + rest).hexdigest() == hashlib.sha256(payloads["qforge"]).hexdigest()


def test_a_signed_link_downloads_with_no_credentials_until_it_expires(client, finished_job, settings):
    job_id, payloads = finished_job()
    response = client.post(f"/v1/jobs/{job_id}/artifact/link", json={"format": "gguf", "expires_in": 600})
    assert response.status_code == 200
    link = response.json()
    assert link["format"] == "gguf" and link["bytes"] == len(payloads["gguf"])
    expires = dt.datetime.fromisoformat(link["expires_at"])
    assert abs((expires - dt.datetime.now(dt.UTC)).total_seconds() - 600) < 5
    if settings.artifact_url:  # the bucket's own presigned link, fetched straight from the store
        assert link["url"].startswith(settings.s3_endpoint_url)
        fetched = httpx.get(link["url"])
    else:  # the API's signed link
        assert link["url"].startswith("http://testserver/v1/artifacts/")
        fetched = client.get(link["url"])
    assert fetched.status_code == 200 and fetched.content == payloads["gguf"]


def test_api_links_are_checked_for_tampering_and_expiry(client, finished_job, monkeypatch):
    monkeypatch.setenv("QFORGE_ARTIFACT_LINKS", "api")
    from app.core.config import get_settings

    get_settings.cache_clear()
    job_id, payloads = finished_job()
    url = client.post(f"/v1/jobs/{job_id}/artifact/link", json={"expires_in": 2}).json()["url"]
    assert url.startswith("http://testserver/v1/artifacts/")  # also when the store could presign
    assert client.get(url, headers={"Range": "bytes=0-9"}).content == payloads["qforge"][:10]

    other_file = url.replace(f"/{job_id}.tar?", f"/{job_id}.gguf.tar?")
    later = url.replace("expires=", "expires=9")
    for forged in (other_file, later, url[:-3] + "AAA"):
        response = client.get(forged)
        assert response.status_code == 403 and response.json()["type"] == PROBLEM + "link-invalid"
    time.sleep(3.1)  # a link lives at least what was asked and less than a second more
    expired = client.get(url)
    assert expired.status_code == 403 and expired.json()["type"] == PROBLEM + "link-expired"


def test_an_api_link_lives_at_least_what_was_asked(settings, monkeypatch):
    """Issued a microsecond before a whole second, a one-second link still works for one
    second (it once expired at that boundary, a microsecond after it was issued)."""
    from app import artifacts
    from app.errors import Problem

    settings.artifact_links = "api"
    issued = dt.datetime(2026, 1, 1, 12, 0, 0, 999_999, tzinfo=dt.UTC)
    artifact = artifacts.StoredArtifact("a" * 32, None, "a" * 32 + ".tar", "0" * 64, 1)
    monkeypatch.setattr(artifacts, "utcnow", lambda: issued)
    url, expires_at = artifacts.signed_link(settings, artifact, 1, "http://testserver/")
    assert (expires_at - issued).total_seconds() >= 1
    stamp = int(url.split("expires=")[1].split("&")[0])
    signature = url.split("signature=")[1]
    for elapsed in (0.0, 0.5, 0.999_999):
        monkeypatch.setattr(artifacts, "utcnow", lambda e=elapsed: issued + dt.timedelta(seconds=e))
        artifacts.check_link(settings, artifact.file, stamp, signature)
    monkeypatch.setattr(artifacts, "utcnow", lambda: issued + dt.timedelta(seconds=2))
    with pytest.raises(Problem) as expired:
        artifacts.check_link(settings, artifact.file, stamp, signature)
    assert expired.value.status == 403 and expired.value.slug == "link-expired"


def test_link_lifetime_is_bounded(client, finished_job, monkeypatch):
    monkeypatch.setenv("QFORGE_ARTIFACT_LINK_MAX_SECONDS", "3600")
    from app.core.config import get_settings

    get_settings.cache_clear()
    job_id, _ = finished_job()
    response = client.post(f"/v1/jobs/{job_id}/artifact/link", json={"expires_in": 3601})
    assert response.status_code == 422 and "3600 seconds" in response.json()["detail"]
    missing = client.post(f"/v1/jobs/{job_id}/artifact/link", json={"format": "awq"})
    assert missing.status_code == 404 and missing.json()["type"] == PROBLEM + "artifact-format-not-exported"


def test_deleting_artifacts_removes_the_files_and_keeps_the_job(client, finished_job, settings, submit):
    job_id, _ = finished_job()
    link = client.post(f"/v1/jobs/{job_id}/artifact/link", json={}).json()["url"]
    response = client.delete(f"/v1/jobs/{job_id}/artifacts")
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "succeeded" and job["artifact"] is None and job["artifacts"] == []
    assert job["artifacts_deleted_reason"] == "request" and job["artifacts_deleted_at"]
    store = store_for(settings)
    assert store.size(f"{job_id}.tar") is None and store.size(f"{job_id}.gguf.tar") is None
    gone = client.get(f"/v1/jobs/{job_id}/artifact?format=gguf")
    assert gone.status_code == 410 and gone.json()["type"] == PROBLEM + "artifact-deleted"
    assert "by request" in gone.json()["detail"]
    if settings.artifact_url:  # S3 answers 403 or 404 for a missing key, depending on the caller's rights
        assert httpx.get(link).status_code in (403, 404)
    else:
        assert client.get(link).json()["type"] == PROBLEM + "artifact-deleted"
    assert client.get(f"/v1/jobs/{job_id}/report").status_code == 200  # the report stays
    assert client.delete(f"/v1/jobs/{job_id}/artifacts").status_code == 200  # again: harmless

    queued = submit(headers={"Idempotency-Key": "another"}).json()["id"]
    busy = client.delete(f"/v1/jobs/{queued}/artifacts")
    assert busy.status_code == 409 and busy.json()["type"] == PROBLEM + "job-not-finished"


def test_retention_deletes_only_artifacts_past_their_time(client, finished_job, settings, monkeypatch):
    from app.artifacts import sweep_expired
    from app.core.config import get_settings

    monkeypatch.setenv("QFORGE_ARTIFACT_RETENTION_DAYS", "7")
    get_settings.cache_clear()
    now = utcnow()
    old_id, _ = finished_job(finished_at=now - dt.timedelta(days=8))
    young_id, young = finished_job(finished_at=now - dt.timedelta(days=6))
    shown = client.get(f"/v1/jobs/{young_id}").json()
    assert dt.datetime.fromisoformat(shown["artifacts_expire_at"]) == (now - dt.timedelta(days=6) + dt.timedelta(days=7))

    assert sweep_expired(get_settings()) == 1
    assert sweep_expired(get_settings()) == 0  # nothing left to do
    old = client.get(f"/v1/jobs/{old_id}").json()
    assert old["artifacts"] == [] and old["artifacts_deleted_reason"] == "retention" and old["artifacts_expire_at"] is None
    assert store_for(get_settings()).size(f"{old_id}.gguf.tar") is None
    gone = client.get(f"/v1/jobs/{old_id}/artifact")
    assert gone.status_code == 410 and "retention" in gone.json()["detail"]
    assert client.get(f"/v1/jobs/{young_id}/artifact?format=gguf").content == young["gguf"]


@pytest.mark.parametrize("service_env", ["s3"], indirect=True)
def test_an_unreachable_store_is_a_503_and_not_ready(client, finished_job, monkeypatch, closed_port):
    from app.core.config import get_settings

    job_id, _ = finished_job()
    monkeypatch.setenv("QFORGE_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")  # the store went away
    get_settings.cache_clear()
    response = client.get(f"/v1/jobs/{job_id}/artifact")
    assert response.status_code == 503 and response.json()["type"] == PROBLEM + "artifact-store-unavailable"
    assert "could not look up s3://" in response.json()["detail"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "could not reach bucket" in ready.json()["checks"]["artifact_store"]



def test_a_link_with_a_non_ascii_signature_is_invalid_not_an_error(client):
    # found by the schema fuzzer: hmac.compare_digest refuses non-ASCII str and raised a 500
    answer = client.get("/v1/artifacts/x.tar", params={"expires": 1, "signature": "×ø\u009b"})
    assert answer.status_code == 403 and answer.json()["type"].endswith("/link-invalid")
