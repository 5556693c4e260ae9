"""API keys: every call but health needs one; scopes read < submit < admin; revoked keys stop
at once; only the key's sha256 is stored, and the key is shown once."""

from __future__ import annotations

import hashlib

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app import tenants
from app.core.db import session_scope
from app.models import DEFAULT_TENANT, ApiKey, Scope

JOB = {"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64"}


@pytest.fixture
def anonymous(settings):
    from app.main import app

    with TestClient(app) as test_client:
        yield test_client


def key_of(scope: Scope, tenant: str = DEFAULT_TENANT) -> str:
    with session_scope() as session:
        return tenants.create_key(session, tenant, scope, f"{scope.value} key").secret


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/x"), ("GET", "/v1/jobs/x/events"),
    ("GET", "/v1/jobs/x/artifact"), ("POST", "/v1/jobs/x/cancel"), ("GET", "/v1/datasets"), ("POST", "/v1/models"),
    ("GET", "/v1/recipes/presets"), ("GET", "/v1/keys"), ("GET", "/v1/me"),
])
def test_every_call_without_a_key_is_401_problem_json(anonymous, method, path):
    answer = anonymous.request(method, path)
    assert answer.status_code == 401
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.json()["type"].endswith("/unauthorized")


def test_health_needs_no_key(anonymous):
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/readyz").status_code in (200, 503)  # its own checks decide, not a key


@pytest.mark.parametrize("header", ["Bearer qf_not-a-key-that-was-ever-issued-000000000000", "Basic dXNlcjpwYXNz", "Bearer "])
def test_a_wrong_key_is_401(anonymous, header):
    key_of(Scope.ADMIN)  # a real key exists; the wrong one still fails
    answer = anonymous.get("/v1/jobs", headers={"Authorization": header})
    assert answer.status_code == 401 and answer.json()["type"].endswith("/unauthorized")


def test_the_key_header_works_as_well_as_bearer(anonymous):
    key = key_of(Scope.READ)
    with session_scope() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hashlib.sha256(key.encode()).hexdigest()))
    expected = {"tenant": DEFAULT_TENANT, "key_id": key_id, "scope": "read"}
    for headers in ({"X-API-Key": key}, bearer(key)):
        me = anonymous.get("/v1/me", headers=headers).json()
        assert {k: me[k] for k in expected} == expected


def test_scopes_read_submit_admin(anonymous):
    read, submit, admin = key_of(Scope.READ), key_of(Scope.SUBMIT), key_of(Scope.ADMIN)
    refused = anonymous.post("/v1/jobs", json=JOB, headers=bearer(read))
    assert refused.status_code == 403 and refused.json()["type"].endswith("/insufficient-scope")
    assert refused.json()["required_scope"] == "submit"
    job = anonymous.post("/v1/jobs", json=JOB, headers=bearer(submit))
    assert job.status_code == 202
    job_id = job.json()["id"]
    assert anonymous.get(f"/v1/jobs/{job_id}", headers=bearer(read)).status_code == 200
    assert anonymous.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(read)).status_code == 403
    assert anonymous.delete("/v1/models/x", headers=bearer(read)).status_code == 403
    assert anonymous.get("/v1/keys", headers=bearer(submit)).status_code == 403
    assert anonymous.post("/v1/keys", json={"scope": "admin"}, headers=bearer(submit)).status_code == 403
    assert anonymous.get("/v1/keys", headers=bearer(admin)).status_code == 200
    assert anonymous.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(admin)).status_code == 200


def test_a_key_is_shown_once_and_stored_only_as_its_sha256(client):
    made = client.post("/v1/keys", json={"name": "nightly", "scope": "submit"})
    assert made.status_code == 201
    key = made.json()["key"]
    assert key.startswith("qf_") and len(key) >= 40
    listed = client.get("/v1/keys").json()
    assert [k for k in listed if k["id"] == made.json()["id"]][0]["prefix"] == key[:10]
    assert key not in client.get("/v1/keys").text
    with session_scope() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.id == made.json()["id"]))
        stored = [str(getattr(row, column.key)) for column in ApiKey.__table__.columns]
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert all(key not in value for value in stored)
    assert client.get("/v1/me", headers=bearer(key)).json()["scope"] == "submit"


def test_a_revoked_key_stops_at_once_and_revoking_again_is_harmless(client, anonymous):
    made = client.post("/v1/keys", json={"scope": "read"}).json()
    assert anonymous.get("/v1/jobs", headers=bearer(made["key"])).status_code == 200
    assert client.delete(f"/v1/keys/{made['id']}").status_code == 204
    assert anonymous.get("/v1/jobs", headers=bearer(made["key"])).status_code == 401
    assert client.delete(f"/v1/keys/{made['id']}").status_code == 204
    assert made["id"] not in [k["id"] for k in client.get("/v1/keys").json()]
    revoked = [k for k in client.get("/v1/keys?include_revoked=true").json() if k["id"] == made["id"]]
    assert revoked and revoked[0]["revoked_at"] is not None
    assert client.delete("/v1/keys/nope").status_code == 404


def test_new_keys_are_validated(client):
    assert client.post("/v1/keys", json={"scope": "root"}).status_code == 422
    assert client.post("/v1/keys", json={"scope": "read", "tenant": "other"}).status_code == 422  # no such field


def test_the_openapi_schema_declares_the_key(client):
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    assert "security" in schema["paths"]["/v1/jobs"]["get"]
    assert "security" not in schema["paths"]["/healthz"]["get"]
