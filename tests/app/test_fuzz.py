"""The API fuzzed from its OpenAPI schema (bench/fuzz.py): no case answers 5xx, every error
is a problem document. And the fuzzer itself finds a 5xx and a bare error where there is one."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from app import tenants
from app.core.db import session_scope
from app.models import DEFAULT_TENANT, Scope, Tenant
from bench.fuzz import fuzz_app

pytestmark = pytest.mark.timeout(900)


def test_no_case_answers_5xx_and_every_error_is_a_problem(settings):
    from app.main import app

    with session_scope() as session:
        session.get(Tenant, DEFAULT_TENANT).requests_per_minute = 0  # every case reaches its route
        session.commit()
        key = tenants.create_key(session, DEFAULT_TENANT, Scope.ADMIN, "fuzz").secret
    result = fuzz_app(app, key, cases_per_operation=8)
    operations = sum(len(methods) for methods in app.openapi()["paths"].values())
    assert result.cases >= operations * 2  # positive and negative cases of each
    assert result.server_errors == []
    assert result.not_problems == []
    assert sum(n for status, n in result.by_status.items() if status < 300) > 0  # some cases got through


def test_the_fuzzer_finds_a_server_error_and_a_bare_error():
    broken = FastAPI()

    @broken.get("/items/{item_id}")
    def item(item_id: int):
        if item_id % 2:
            raise RuntimeError("odd")
        return PlainTextResponse("nope", status_code=404)

    result = fuzz_app(broken, "unused", cases_per_operation=30)
    assert result.server_errors and result.not_problems
