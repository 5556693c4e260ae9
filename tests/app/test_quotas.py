"""Per-tenant limits: active jobs (429 + Retry-After), stored bytes (413 for uploads, 409 for
submissions), API calls per minute (a token bucket: 429 + Retry-After). Figures are checked
against arithmetic done here, not against the code's own numbers."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from sqlalchemy import func, select

from app import quotas
from app.core.db import session_scope
from app.models import DEFAULT_TENANT, Dataset, Tenant
from qforge.cli import main as qforge_main

JOB = {"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64"}


@pytest.fixture(autouse=True)
def fresh_buckets(monkeypatch):
    monkeypatch.setattr(quotas, "rate_limiter", quotas.RateLimiter())


def set_limits(**values) -> None:
    with session_scope() as session:
        tenant = session.get(Tenant, DEFAULT_TENANT)
        for name, value in values.items():
            setattr(tenant, name, value)


def npz(samples: int) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((samples, 1, 8, 8), np.float32))
    return buffer.getvalue()


def upload(client, data: bytes, **kwargs):
    return client.post("/v1/datasets", files={"file": ("d.npz", data, "application/octet-stream")}, **kwargs)


def dataset_rows() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Dataset))


def test_the_token_bucket_allows_a_tenth_of_a_minute_at_once_then_the_rate():
    now = [100.0]
    limiter = quotas.RateLimiter(clock=lambda: now[0])
    assert [limiter.take("a", 600) for _ in range(60)] == [0.0] * 60  # 600/min: bursts of 60
    assert limiter.take("a", 600) == pytest.approx(0.1)  # then one call per 0.1 s
    assert limiter.take("b", 600) == 0.0  # another tenant's bucket is its own
    now[0] += 0.1
    assert limiter.take("a", 600) == 0.0 and limiter.take("a", 600) > 0
    now[0] += 3600
    assert sum(limiter.take("a", 600) == 0.0 for _ in range(100)) == 60  # refills to the burst, no more
    assert all(limiter.take("c", 0) == 0.0 for _ in range(10_000))  # 0: no limit


def test_calls_past_the_rate_are_429_with_retry_after(client):
    set_limits(requests_per_minute=30)  # bursts of 3, then one call each 2 s
    assert [client.get("/v1/jobs").status_code for _ in range(3)] == [200, 200, 200]
    limited = client.get("/v1/jobs")
    assert limited.status_code == 429 and limited.json()["type"].endswith("/rate-limited")
    assert int(limited.headers["retry-after"]) == 2
    assert client.get("/healthz").status_code == 200  # probes are not the tenant's calls


def test_active_jobs_past_the_limit_are_429_until_one_ends(client, submit):
    set_limits(max_active_jobs=2)
    first = submit(headers={"Idempotency-Key": "one"}).json()["id"]
    submit()
    refused = submit()
    assert refused.status_code == 429 and refused.json()["type"].endswith("/too-many-active-jobs")
    assert refused.headers["retry-after"] == str(quotas.ACTIVE_JOBS_RETRY_AFTER_S)
    assert (refused.json()["limit"], refused.json()["active"]) == (2, 2)
    replay = submit(headers={"Idempotency-Key": "one"})  # a retry of an accepted job is never refused
    assert replay.status_code == 202 and replay.json()["id"] == first
    client.post(f"/v1/jobs/{first}/cancel")
    assert submit().status_code == 202


def test_an_upload_past_the_storage_limit_is_413_and_leaves_nothing(client, settings):
    small, big = npz(2), npz(40)
    set_limits(max_stored_bytes=len(small) + len(big) // 2)
    assert upload(client, small).status_code == 201
    refused = upload(client, big)
    assert refused.status_code == 413 and refused.json()["type"].endswith("/storage-quota-exceeded")
    assert refused.json()["stored_bytes"] == len(small)
    assert dataset_rows() == 1
    assert [p.name for p in settings.datasets_dir.iterdir()] == [client.get("/v1/datasets").json()["items"][0]["id"]]


def test_an_upload_without_a_length_is_measured_once_received(client, settings):
    """Sent chunked, with no Content-Length: the quota is checked after the body, and the
    upload removed again when it does not fit."""
    data = npz(40)
    set_limits(max_stored_bytes=len(data) - 1)
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    refused = client.post("/v1/datasets", content=iter([body[:1000], body[1000:]]),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert refused.status_code == 413 and refused.json()["incoming_bytes"] == 0
    assert dataset_rows() == 0 and not any(settings.datasets_dir.iterdir())
    set_limits(max_stored_bytes=len(data))
    accepted = client.post("/v1/datasets", content=iter([body]),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert accepted.status_code == 201 and accepted.json()["bytes"] == len(data)


def test_a_tenant_over_its_storage_cannot_submit_and_me_shows_the_figures(client, submit, set_job):
    data = npz(10)
    assert upload(client, data).status_code == 201
    job_id = submit().json()["id"]
    set_job(job_id, status="succeeded", artifact_path=f"{job_id}.tar", artifact_bytes=1000, artifacts_total_bytes=3000)
    me = client.get("/v1/me").json()
    assert me["usage"] == {"active_jobs": 0, "stored_bytes": len(data) + 3000}
    assert me["limits"]["max_active_jobs"] == 20  # the service's default
    set_limits(max_stored_bytes=len(data) + 3000)
    refused = submit()
    assert refused.status_code == 409 and refused.json()["type"].endswith("/storage-quota-exceeded")
    assert client.delete(f"/v1/datasets/{client.get('/v1/datasets').json()['items'][0]['id']}").status_code == 204
    assert submit().status_code == 202


def test_the_quota_check_reads_only_active_jobs_and_jobs_holding_artifacts(client, submit, set_job):
    """A tenant's history must not make each submission slower: SQLite's own query plan shows
    which index each part of the check searches; the figures match a count done here."""
    from sqlalchemy import text

    ids = [submit().json()["id"] for _ in range(4)]
    set_job(ids[0], status="succeeded", artifact_path="a.tar", artifact_bytes=100, artifacts_total_bytes=None)
    set_job(ids[1], status="succeeded", artifact_path="b.tar", artifact_bytes=10, artifacts_total_bytes=70)
    set_job(ids[2], status="failed")
    with session_scope() as session:
        assert quotas.usage(session, DEFAULT_TENANT) == quotas.Usage(active_jobs=1, stored_bytes=100 + 70)
        statement = quotas._USAGE.params(tenant_id=DEFAULT_TENANT)
        sql = str(statement.compile(session.get_bind(), compile_kwargs={"literal_binds": True}))
        assert f"tenant_id = '{DEFAULT_TENANT}'" in sql
        plan = " | ".join(row[-1] for row in session.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
    assert "jobs USING COVERING INDEX ix_jobs_tenant_status (tenant_id=? AND status=?)" in plan, plan
    assert "jobs USING COVERING INDEX ix_jobs_tenant_stored_artifacts (tenant_id=?)" in plan, plan


def test_admin_cli_sets_and_resets_a_tenant_s_limits(settings, capsys):
    data_dir = ["--data-dir", str(settings.data_dir)]
    assert qforge_main(["admin", "tenant", "quota", DEFAULT_TENANT, "--max-active-jobs", "3",
                        "--max-stored-bytes", "2GiB", "--requests-per-minute", "0", *data_dir]) == 0
    shown = dict(line.split("\t")[:2] for line in capsys.readouterr().out.splitlines())
    assert shown["max_active_jobs"] == "3" and shown["max_stored_bytes"] == str(2 * 2**30)
    assert shown["requests_per_minute"] == "0"
    with pytest.raises(SystemExit) as usage_error:
        qforge_main(["admin", "tenant", "quota", DEFAULT_TENANT, "--max-stored-bytes", "lots", *data_dir])
    assert usage_error.value.code == 2
    assert qforge_main(["admin", "tenant", "quota", "ghost", *data_dir]) != 0
    assert qforge_main(["admin", "tenant", "quota", DEFAULT_TENANT, "--reset", *data_dir]) == 0
    with session_scope() as session:
        tenant = session.get(Tenant, DEFAULT_TENANT)
        assert (tenant.max_active_jobs, tenant.max_stored_bytes, tenant.requests_per_minute) == (None, None, None)
