"""Tenant isolation and the schema fuzzer on a real PostgreSQL and Redis.

tests/app runs both on the embedded default (SQLite); tenant filters and error handling must
hold where production runs too (a query that SQLite forgives can fail on PostgreSQL). These
call the reliability benchmark's own runners, in-process, on a database of their own."""

import pytest

from bench.reliability import run_fuzz, run_isolation

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]


@pytest.fixture
def backend(postgres_url, redis_url, new_database) -> dict[str, str]:
    return {"database_url": new_database(), "broker_url": f"{redis_url.rsplit('/', 1)[0]}/9"}


def test_tenant_b_reaches_none_of_tenant_as_objects_on_postgres(tmp_path, backend):
    result = run_isolation(tmp_path, **backend)
    # every object route of the schema, each list, the dashboard pages and the replayed key:
    # the SQLite run of the same probes counts 34
    assert result["isolation_probes"] >= 30
    assert result["leaks"] == []


def test_no_fuzz_case_answers_5xx_on_postgres(tmp_path, backend):
    result = run_fuzz(tmp_path, cases=4, **backend)
    assert result["fuzz_cases"] >= 100  # about 25 operations, positive and negative cases
    assert result["fuzz_5xx"] == 0, result["examples"]
    assert result["fuzz_errors_not_problem_json"] == 0, result["examples"]


def test_text_holding_nul_is_refused_or_matches_nothing_on_postgres(tmp_path, backend):
    """PostgreSQL refuses NUL in text, where SQLite stores it: the schema fuzzer found a key
    name holding one answered 500 there. Each place free text reaches the database."""
    import io

    import numpy as np
    from fastapi.testclient import TestClient

    from app.dashboard.auth import API_KEY_COOKIE
    from bench.reliability import in_process, make_key

    with in_process(tmp_path / "data", **backend) as (app, _):
        key = make_key("nul")
        client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
        named = client.post("/v1/keys", json={"name": "ci\x00key", "scope": "read"})
        assert named.status_code == 422 and named.headers["content-type"] == "application/problem+json"
        buffer = io.BytesIO()
        np.savez(buffer, x=np.zeros((2, 1, 8, 8), np.float32), y=np.arange(2))
        upload = client.post("/v1/datasets", files={"file": ("d.npz", buffer.getvalue(), "application/octet-stream")},
                             data={"name": "digits\x00"})
        assert upload.status_code == 422, upload.text
        unnamed = client.post("/v1/datasets", files={"file": ("d\x00.npz", buffer.getvalue(), "application/octet-stream")})
        assert unnamed.status_code == 201 and "\x00" not in unnamed.json()["name"], unnamed.text
        client.cookies.set(API_KEY_COOKIE, key)
        page = client.get("/", params={"model": "smol\x00"})
        assert page.status_code == 200
