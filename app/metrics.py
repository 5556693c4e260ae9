"""Prometheus metrics, served at GET /metrics (app/api/routes/metrics.py).

Two kinds, for two reasons:

- HTTP requests (`qforge_http_request_duration_seconds`, whose `_count` is the request count)
  are observed in this process by the request middleware (app/middleware.py). Each API
  process keeps its own, so each API replica is its own scrape target (Prometheus adds the
  `instance` label; sum across instances). One `qforge serve` is one process.
- Everything about jobs is read from the database when Prometheus scrapes, the single
  source of truth that every API process and every worker writes. This is what makes the
  numbers right however many API processes and workers there are: nothing is counted in a
  process that may restart, or that is a short-lived pool child (a worker forks one per job).
  Each replica reports the same values, so aggregate them across instances with max, not sum.

The job duration histogram is computed over all finished jobs, not a recent window: a
Prometheus histogram is a set of counters that only grow, and `rate()` and
`histogram_quantile()` over it give the durations of the jobs that finished in any window
the query asks for. A fixed window of recent jobs would shrink as jobs age out of it and
read as counter resets. Job rows are never deleted (only their artifacts are), so the
counts only grow. The cost is one aggregate query over the finished jobs per scrape.

A collector that fails (database or broker unreachable) leaves its metrics out and sets
`qforge_database_up` or `qforge_broker_up` to 0: a scrape never fails because of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, GCCollector, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Float, case, cast, extract, func, select
from sqlalchemy.orm import Session

from app import queue
from app.core.db import new_session
from app.models import TERMINAL, Job, JobStatus
from worker.celery_app import JOB_QUEUE

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

HTTP_REQUEST_SECONDS = Histogram(
    "qforge_http_request_duration_seconds",
    "HTTP requests by method, route template and status: from the request's start to its "
    "response's last byte (a server-sent event stream counts its whole life)",
    ["method", "route", "status"],
    registry=REGISTRY,
)

# Quantization jobs take seconds (a digits CNN) to hours (a large LLM with GPTQ).
JOB_DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600)


def _seconds_between(session: Session, start, end):
    """SQL for end - start in seconds, on the database the session talks to."""
    if session.get_bind().dialect.name == "sqlite":  # stored as text; julianday reads it
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return cast(extract("epoch", end - start), Float)


def jobs_by_status(session: Session) -> dict[JobStatus, tuple[int, int, int]]:
    """Per status: (jobs, runs started, runs restarted after a lost worker). A job's
    `attempts` counts its runs, and only a lost worker's job is ever run again
    (worker/state.py), so every attempt past the first is one."""
    query = select(
        Job.status,
        func.count(),
        func.coalesce(func.sum(Job.attempts), 0),
        func.coalesce(func.sum(case((Job.attempts > 1, Job.attempts - 1), else_=0)), 0),
    ).group_by(Job.status)
    counts = {status: (0, 0, 0) for status in JobStatus}
    for status, jobs, attempts, retries in session.execute(query):
        counts[JobStatus(status)] = (int(jobs), int(attempts), int(retries))
    return counts


def job_durations(session: Session) -> dict[JobStatus, tuple[list[int], int, float]]:
    """Per final status, over the jobs that ran and finished (first start to finish, every
    attempt included): (cumulative count at each of JOB_DURATION_BUCKETS, count, sum)."""
    seconds = _seconds_between(session, Job.started_at, Job.finished_at)
    query = (
        select(
            Job.status,
            func.count(),
            func.coalesce(func.sum(seconds), 0.0),
            *(func.sum(case((seconds <= bound, 1), else_=0)) for bound in JOB_DURATION_BUCKETS),
        )
        .where(Job.status.in_(TERMINAL), Job.started_at.is_not(None), Job.finished_at.is_not(None))
        .group_by(Job.status)
    )
    return {
        JobStatus(status): ([int(n or 0) for n in buckets], int(count), float(total))
        for status, count, total, *buckets in session.execute(query)
    }


class JobCollector(Collector):
    """Jobs by status, runs and lost-worker retries, job durations: two queries a scrape."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("qforge_database_up", "1 if the database answered this scrape's queries, else 0")
        try:
            with new_session() as session:
                counts = jobs_by_status(session)
                durations = job_durations(session)
        except Exception:
            log.warning("metrics: could not read the jobs from the database", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        jobs = GaugeMetricFamily("qforge_jobs", "Jobs in the database by status", labels=["status"])
        runs = CounterMetricFamily(
            "qforge_job_attempts", "Runs of jobs started by workers, by the job's status now", labels=["status"]
        )
        retries = CounterMetricFamily(
            "qforge_job_retries", "Runs started again after their worker was lost, by the job's status now",
            labels=["status"],
        )
        for status, (n, attempts, restarted) in counts.items():
            jobs.add_metric([status.value], n)
            runs.add_metric([status.value], attempts)
            retries.add_metric([status.value], restarted)
        yield from (jobs, runs, retries)

        duration = HistogramMetricFamily(
            "qforge_job_duration_seconds",
            "Finished jobs by final status: from the first run's start to the finish, all attempts included",
            labels=["status"],
        )
        for status in sorted(TERMINAL):
            cumulative, count, total = durations.get(status, ([0] * len(JOB_DURATION_BUCKETS), 0, 0.0))
            buckets = [(str(float(bound)), n) for bound, n in zip(JOB_DURATION_BUCKETS, cumulative)]
            duration.add_metric([status.value], [*buckets, ("+Inf", count)], total)
        yield duration


class QueueCollector(Collector):
    """Messages waiting in the broker's job queue (one round trip to the broker a scrape)."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("qforge_broker_up", "1 if the broker answered this scrape, else 0")
        try:
            depth = queue.queue_depth()
        except Exception:
            log.warning("metrics: could not read the job queue's length from the broker", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        waiting = GaugeMetricFamily(
            "qforge_queue_depth", "Job messages waiting in the broker (not yet taken by a worker)", labels=["queue"]
        )
        waiting.add_metric([JOB_QUEUE], depth)
        yield waiting


REGISTRY.register(JobCollector())
REGISTRY.register(QueueCollector())
