"""Two tenants, every route that names an object, every object type: tenant B never reads,
lists, downloads, cancels or deletes tenant A's job, dataset, model, artifact or key (404,
exactly as for an id that does not exist). The probes themselves are bench/isolation.py,
also run by bench/reliability.py (in-process, on SQLite and on PostgreSQL + Redis)."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_model

from app import tenants
from app.artifact_store import store_for
from app.core.db import session_scope
from app.dashboard.auth import API_KEY_COOKIE
from app.models import JobStatus, Scope, utcnow
from bench import isolation
from quantcore.models.digits_cnn import DigitsCNN


def tenant_client(tenant_id: str, scope: Scope = Scope.ADMIN) -> TestClient:
    from app.main import app

    with session_scope() as session:
        if session.get(tenants.Tenant, tenant_id) is None:
            tenants.create_tenant(session, tenant_id)
        key = tenants.create_key(session, tenant_id, scope, "isolation test").secret
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    client.cookies.set(API_KEY_COOKIE, key)
    return client


@pytest.fixture
def tenant_a_objects(client, submit, set_job, settings, tmp_path) -> dict[str, str]:
    """One of each object of the default tenant (the `client` fixture's): a succeeded job with
    its artifact in the store, an uploaded dataset and model, and an API key."""
    key = "isolation-a-" + os.urandom(4).hex()
    job_id = submit(headers={"Idempotency-Key": key}).json()["id"]
    payload = os.urandom(4096)
    staged = tmp_path / f"{job_id}.tar"
    staged.write_bytes(payload)
    store_for(settings).put(staged.name, staged)
    digest = hashlib.sha256(payload).hexdigest()
    entry = {"format": "qforge", "folder": "artifact", "file": staged.name, "sha256": digest, "bytes": len(payload)}
    set_job(job_id, status=JobStatus.SUCCEEDED, finished_at=utcnow(), report={"artifacts": [entry]},
            artifact_path=staged.name, artifact_sha256=digest, artifact_bytes=len(payload))

    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))
    dataset = client.post("/v1/datasets", files={"file": ("a.npz", buffer.getvalue(), "application/octet-stream")})
    weights = tmp_path / "model.safetensors"
    save_model(DigitsCNN(), str(weights))
    model = client.post("/v1/models", files={"file": ("model.safetensors", weights.read_bytes(), "application/octet-stream")},
                        data={"config": json.dumps({"architecture": "digits-cnn"})})
    assert dataset.status_code == 201 and model.status_code == 201, (dataset.text, model.text)
    api_key = client.post("/v1/keys", json={"name": "a's ci", "scope": "read"}).json()
    return {"job": job_id, "dataset": dataset.json()["id"], "model": model.json()["id"], "key": api_key["id"],
            "idempotency_key": key}


def test_no_route_lets_one_tenant_reach_anothers_objects(client, tenant_a_objects):
    with tenant_client("tenant-b") as other:
        result = isolation.probe(client, other, tenant_a_objects, dashboard_b=other)
    # every route naming a job, dataset, model or key was probed: the count is the schema's
    routes = isolation.object_routes(client.get("/openapi.json").json())
    assert len(routes) >= 14
    assert {path for _, path in routes} >= {"/v1/jobs/{job_id}/artifact", "/v1/models/{model_id}", "/v1/keys/{key_id}"}
    assert result.leaks == []
    assert result.probes == len(routes) + len(isolation.LISTS) + 2 + 1 + 1 + len(isolation.DASHBOARD_PAGES) + 3 + 3


def test_the_probe_finds_a_leak_when_there_is_one(client, tenant_a_objects):
    # the probe must be able to fail: the owner probing itself "leaks" everything
    result = isolation.probe(client, client, tenant_a_objects, dashboard_b=client)
    assert len(result.leaks) >= 10


def test_each_tenant_lists_and_counts_only_its_own_jobs(client, submit):
    mine = {submit().json()["id"] for _ in range(3)}
    with tenant_client("tenant-b") as other:
        theirs = {other.post("/v1/jobs", json={"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64"}).json()["id"]}
        listed_b = other.get("/v1/jobs").json()
        page_b = other.get("/").text
    listed_a = client.get("/v1/jobs").json()
    assert {j["id"] for j in listed_a["items"]} == mine and listed_a["total"] == 3
    assert {j["id"] for j in listed_b["items"]} == theirs and listed_b["total"] == 1
    assert all(job_id not in page_b for job_id in mine)


def test_the_same_idempotency_key_names_two_jobs_for_two_tenants(client, submit):
    first = submit(headers={"Idempotency-Key": "nightly-1"})
    with tenant_client("tenant-b") as other:
        second = other.post("/v1/jobs", json={"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64"},
                            headers={"Idempotency-Key": "nightly-1"})
        replay = other.post("/v1/jobs", json={"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64"},
                            headers={"Idempotency-Key": "nightly-1"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] != second.json()["id"]
    assert replay.json()["id"] == second.json()["id"] and replay.headers["Idempotent-Replayed"] == "true"
