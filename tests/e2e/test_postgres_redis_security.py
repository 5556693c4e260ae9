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
