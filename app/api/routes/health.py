"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from app import queue
from app.artifact_store import store_for
from app.core.config import get_settings
from app.core.db import schema_problem
from app.errors import Problem
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up (nothing else is checked: a restart would not fix a database outage)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health)
def readyz() -> Health:
    """Ready to take jobs: the database answers at the current schema, the broker answers,
    and the artifact store (folder or bucket) exists."""
    checks = {
        "database": _check(_database),
        "broker": _check(queue.check_broker),
        "artifact_store": _check(lambda: store_for(get_settings()).check()),
    }
    failing = {name: result for name, result in checks.items() if result != "ok"}
    if failing:
        detail = "; ".join(f"{name}: {result}" for name, result in failing.items())
        raise Problem(503, "not-ready", "Not ready", detail, checks=checks)
    return Health(status="ok", checks=checks)


def _database() -> None:
    if (problem := schema_problem()) is not None:
        raise RuntimeError(problem)


def _check(probe) -> str:
    try:
        probe()
    except Exception as exc:  # any failure means not ready; its message says which
        return f"{type(exc).__name__}: {exc}"
    return "ok"
