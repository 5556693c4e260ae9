"""Per-tenant limits: jobs queued or running at once, bytes kept, API calls per minute.

Each tenant's own limit is in its row (set with `qforge admin tenant quota`), else the
service's default (Settings.tenant_*). What is checked where:
- active jobs, at submission: `429 too-many-active-jobs` with Retry-After (it clears as jobs end);
- stored bytes (uploads + every artifact of the tenant's jobs): an upload that would pass the
  limit is `413 storage-quota-exceeded`, refused from its Content-Length before the body is
  read where it can be, else once it is received (and then removed); a submission while the
  tenant is at or over it is `409 storage-quota-exceeded` (its artifact would add to it);
- calls per minute, at the key check: a token bucket per tenant, bursts of a tenth of the
  minute's calls, `429 rate-limited` with Retry-After. The buckets live in each API process:
  with N replicas behind a balancer a tenant gets up to N times the rate, which is the price
  of never adding a shared store's round trip to every call.

A check and the insert it guards are not one transaction, so two submissions racing at the
limit may both pass: the limits bound work and storage, they are not exact to one job.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import Problem
from app.models import STORED_ARTIFACTS, Dataset, Job, JobStatus, Tenant, UploadedModel

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
ACTIVE_JOBS_RETRY_AFTER_S = 30  # a guess at when one job may have finished; clients may poll sooner


@dataclass(frozen=True)
class Limits:
    max_active_jobs: int
    max_stored_bytes: int
    requests_per_minute: int  # 0: no limit


@dataclass(frozen=True)
class Usage:
    active_jobs: int
    stored_bytes: int


def limits(tenant: Tenant | None, settings: Settings) -> Limits:
    def own(value: int | None, default: int) -> int:
        return default if value is None else value

    return Limits(
        own(tenant and tenant.max_active_jobs, settings.tenant_max_active_jobs),
        own(tenant and tenant.max_stored_bytes, settings.tenant_max_stored_bytes),
        own(tenant and tenant.requests_per_minute, settings.tenant_requests_per_minute),
    )


# Built once, with the tenant as a bound parameter: building and hashing these statements
# anew cost more than running them, on every submission.
_TENANT = bindparam("tenant_id")
_ACTIVE_JOBS = select(func.count()).select_from(Job).where(Job.tenant_id == _TENANT, Job.status.in_(ACTIVE))
_UPLOADED_BYTES = [select(func.coalesce(func.sum(table.bytes), 0)).where(table.tenant_id == _TENANT)
                   for table in (Dataset, UploadedModel)]
# filtered by the partial index ix_jobs_tenant_stored_artifacts's own condition (app/models.py),
# which the planner needs to find in the query to use the index
_ARTIFACT_BYTES = select(func.coalesce(func.sum(func.coalesce(Job.artifacts_total_bytes, Job.artifact_bytes)), 0)).where(
    Job.tenant_id == _TENANT, STORED_ARTIFACTS
)
_STORED_BYTES = select(*(part.scalar_subquery() for part in (*_UPLOADED_BYTES, _ARTIFACT_BYTES)))
_USAGE = select(*(part.scalar_subquery() for part in (_ACTIVE_JOBS, *_UPLOADED_BYTES, _ARTIFACT_BYTES)))


def stored_bytes(session: Session, tenant_id: str) -> int:
    """Uploads and artifacts in one round trip, without counting active jobs (an upload's check)."""
    row = session.execute(_STORED_BYTES, {"tenant_id": tenant_id}).one()
    return sum(int(value or 0) for value in row)


def usage(session: Session, tenant_id: str) -> Usage:
    """Both counts in one round trip (a submission checks them on every call)."""
    row = session.execute(_USAGE, {"tenant_id": tenant_id}).one()
    return Usage(int(row[0] or 0), sum(int(value or 0) for value in row[1:]))


def check_submission(session: Session, tenant_id: str, settings: Settings) -> None:
    """Before a new job is stored (an idempotent replay is not a new job and is not checked)."""
    limit = limits(session.get(Tenant, tenant_id), settings)
    current = usage(session, tenant_id)
    active, stored = current.active_jobs, current.stored_bytes
    if active >= limit.max_active_jobs:
        raise Problem(
            429, "too-many-active-jobs", "Too many active jobs",
            f"tenant '{tenant_id}' has {active} jobs queued or running, its limit; submit again once one has finished "
            "(or cancel one)",
            headers={"Retry-After": str(ACTIVE_JOBS_RETRY_AFTER_S)}, limit=limit.max_active_jobs, active=active,
        )
    if stored >= limit.max_stored_bytes:
        raise _storage_problem(409, tenant_id, stored, 0, limit.max_stored_bytes, "its job's artifact would add to it")


def check_upload(session: Session, tenant_id: str, settings: Settings, incoming: int) -> None:
    """Whether `incoming` more bytes fit the tenant's storage."""
    limit = limits(session.get(Tenant, tenant_id), settings).max_stored_bytes
    stored = stored_bytes(session, tenant_id)
    if stored + incoming > limit:
        raise _storage_problem(413, tenant_id, stored, incoming, limit, "the upload would pass it")


def _storage_problem(status: int, tenant_id: str, stored: int, incoming: int, limit: int, why: str) -> Problem:
    detail = (
        f"tenant '{tenant_id}' keeps {stored} bytes of uploads and artifacts, its limit is {limit} bytes, and {why}; "
        "delete uploads (DELETE /v1/models/{id}, /v1/datasets/{id}) or artifacts (DELETE /v1/jobs/{id}/artifacts)"
    )
    return Problem(status, "storage-quota-exceeded", "Storage quota exceeded", detail,
                   limit_bytes=limit, stored_bytes=stored, incoming_bytes=incoming)


class RateLimiter:
    """A token bucket per tenant: `requests_per_minute` tokens a minute, holding at most a
    tenth of them, so a tenant may burst but not hold the API for long."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when counted)
        self._lock = threading.Lock()

    def take(self, tenant_id: str, requests_per_minute: int) -> float:
        """0 when the call may go ahead (a token is taken), else the seconds until it may."""
        if requests_per_minute <= 0:
            return 0.0
        capacity = max(1.0, requests_per_minute / 10)
        per_second = requests_per_minute / 60
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(tenant_id, (capacity, now))
            tokens = min(capacity, tokens + (now - then) * per_second)
            if tokens >= 1 - 1e-9:  # a token earned in exactly the time it takes counts, despite rounding
                self._buckets[tenant_id] = (max(0.0, tokens - 1), now)
                return 0.0
            self._buckets[tenant_id] = (tokens, now)
            return (1 - tokens) / per_second


rate_limiter = RateLimiter()


def check_rate(tenant: Tenant | None, tenant_id: str, settings: Settings) -> None:
    per_minute = limits(tenant, settings).requests_per_minute
    wait = rate_limiter.take(tenant_id, per_minute)
    if wait > 0:
        raise Problem(
            429, "rate-limited", "Too many requests",
            f"tenant '{tenant_id}' may make {per_minute} API calls a minute; wait {wait:.1f} s",
            headers={"Retry-After": str(max(1, math.ceil(wait)))}, limit_per_minute=per_minute,
        )
