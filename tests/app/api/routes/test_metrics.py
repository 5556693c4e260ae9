"""GET /metrics, read back with prometheus_client's own parser and held to what the test
did: requests it made, job rows it wrote, messages it published."""

import datetime as dt
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import crud, queue
from app.core.config import get_settings
from app.core.db import new_session
from app.metrics import JOB_DURATION_BUCKETS
from app.models import DEFAULT_TENANT, Job, JobStatus
from quantcore.job import JobRequest

RTN_JOB = JobRequest(model="bundled:smollm2-135m", recipe="w4a16-rtn-g64")


def scrape(client) -> dict[tuple[str, frozenset], float]:
    """Every sample of one scrape: (sample name, its labels) -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def http_count(samples, method: str, route: str, status: int) -> float:
    return value(samples, "qforge_http_request_duration_seconds_count", method=method, route=route, status=str(status)) or 0.0


def test_needs_no_api_key_and_serves_the_text_format(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "# TYPE qforge_http_request_duration_seconds histogram" in response.text


def test_each_request_is_counted_once_under_its_route_template(client, submit):
    job_id = submit().json()["id"]
    before = scrape(client)
    for _ in range(3):
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert client.get("/v1/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    for _ in range(2):
        assert client.get(f"/v1/jobs/{job_id}/logs").status_code == 200
    assert client.get("/no/such/page").status_code == 404
    assert client.post("/healthz").status_code == 405
    after = scrape(client)

    expected = {
        ("GET", "/v1/jobs/{job_id}", 200): 3,
        ("GET", "/v1/jobs/{job_id}", 404): 1,
        ("GET", "/v1/jobs/{job_id}/logs", 200): 2,
        ("GET", "<unmatched>", 404): 1,
        ("POST", "/healthz", 405): 1,
        ("GET", "/metrics", 200): 1,  # the first scrape, counted once its response was sent
    }
    for (method, route, status), n in expected.items():
        assert http_count(after, method, route, status) - http_count(before, method, route, status) == n, (route, status)
    # every bucket and the +Inf one agree with the count; the sum is a plausible duration
    labels = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "200"}
    inf = value(after, "qforge_http_request_duration_seconds_bucket", le="+Inf", **labels)
    assert inf == value(after, "qforge_http_request_duration_seconds_count", **labels)
    assert 0 < value(after, "qforge_http_request_duration_seconds_sum", **labels) < 60
    # no raw path, and so no id, ever becomes a label value
    routes = {dict(labels)["route"] for name, labels in after if name.startswith("qforge_http_request")}
    assert not any(job_id in route or "0123456789abcdef" in route or "no/such" in route for route in routes)


def test_static_files_are_counted_under_their_mount(client):
    before = scrape(client)
    assert client.get("/static/dashboard.css").status_code == 200
    after = scrape(client)
    assert http_count(after, "GET", "/static/{path}", 200) - http_count(before, "GET", "/static/{path}", 200) == 1


def _insert_jobs(rows: list[dict]) -> None:
    with new_session() as session:
        for values in rows:
            job, _ = crud.create_job(session, RTN_JOB, None, tenant_id=DEFAULT_TENANT)
            for key, v in values.items():
                setattr(job, key, v)
            session.commit()


def test_jobs_by_status_attempts_and_retries_are_the_rows_counts(client):
    start = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.UTC)
    rows = (
        [{"status": JobStatus.QUEUED}] * 4
        + [{"status": JobStatus.QUEUED, "attempts": 1}]  # requeued after a lost worker
        + [{"status": JobStatus.RUNNING, "attempts": 1, "started_at": start}] * 2
        + [{"status": JobStatus.SUCCEEDED, "attempts": 1, "started_at": start, "finished_at": start}] * 3
        + [{"status": JobStatus.SUCCEEDED, "attempts": 2, "started_at": start, "finished_at": start}]
        + [{"status": JobStatus.FAILED, "attempts": 3, "started_at": start, "finished_at": start}]
    )
    _insert_jobs(rows)
    jobs = Counter(r["status"] for r in rows)
    attempts, retries = Counter(), Counter()
    for r in rows:
        attempts[r["status"]] += r.get("attempts", 0)
        retries[r["status"]] += max(0, r.get("attempts", 0) - 1)

    samples = scrape(client)
    assert value(samples, "qforge_database_up") == 1
    for status in JobStatus:
        assert value(samples, "qforge_jobs", status=status.value) == jobs[status], status
        assert value(samples, "qforge_job_attempts_total", status=status.value) == attempts[status], status
        assert value(samples, "qforge_job_retries_total", status=status.value) == retries[status], status


def test_job_durations_are_a_histogram_of_finished_jobs(client):
    start = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.UTC)
    finished = {  # seconds from first start to finish, none on a bucket's bound
        JobStatus.SUCCEEDED: [4.5, 45.25, 95.0, 3000.0, 5 * 3600.0],
        JobStatus.FAILED: [1.0, 700.0],
        JobStatus.CANCELLED: [20.0],
    }
    rows = [
        {"status": status, "attempts": 1, "started_at": start, "finished_at": start + dt.timedelta(seconds=s)}
        for status, durations in finished.items() for s in durations
    ]
    rows.append({"status": JobStatus.CANCELLED})  # cancelled while queued: it never ran, no duration
    rows.append({"status": JobStatus.RUNNING, "attempts": 1, "started_at": start})  # not finished
    _insert_jobs(rows)

    samples = scrape(client)
    for status, durations in finished.items():
        labels = {"status": status.value}
        for bound in JOB_DURATION_BUCKETS:
            expected = sum(d <= bound for d in durations)
            assert value(samples, "qforge_job_duration_seconds_bucket", le=str(float(bound)), **labels) == expected
        assert value(samples, "qforge_job_duration_seconds_bucket", le="+Inf", **labels) == len(durations)
        assert value(samples, "qforge_job_duration_seconds_count", **labels) == len(durations)
        assert value(samples, "qforge_job_duration_seconds_sum", **labels) == pytest.approx(sum(durations), abs=0.01)


def test_queue_depth_is_the_messages_waiting_in_the_broker(client, submit):
    assert value(scrape(client), "qforge_queue_depth", queue="qforge.jobs") == 0
    published = [submit().json()["id"] for _ in range(2)]  # the API publishes one message each
    for _ in range(3):
        queue.enqueue("f" * 32)  # and messages for ids no job has: the broker only counts
    samples = scrape(client)
    assert value(samples, "qforge_broker_up") == 1
    assert value(samples, "qforge_queue_depth", queue="qforge.jobs") == len(published) + 3


def test_an_unreachable_broker_is_broker_up_0_and_no_depth(client, monkeypatch, closed_port):
    monkeypatch.setenv("QFORGE_BROKER_URL", f"redis://127.0.0.1:{closed_port}/0")
    get_settings.cache_clear()
    samples = scrape(client)  # 200, not a failed scrape
    assert value(samples, "qforge_broker_up") == 0
    assert not any(name == "qforge_queue_depth" for name, _ in samples)
    assert value(samples, "qforge_jobs", status="queued") == 0  # the database's metrics are still there


def test_an_unreadable_database_is_database_up_0_and_no_job_metrics(client, monkeypatch):
    def broken(session):
        raise RuntimeError("database down")

    monkeypatch.setattr("app.metrics.jobs_by_status", broken)
    samples = scrape(client)
    assert value(samples, "qforge_database_up") == 0
    assert not any(name.startswith(("qforge_jobs", "qforge_job_")) for name, _ in samples)
    assert value(samples, "qforge_broker_up") == 1


def test_rows_of_every_status_are_counted_on_the_real_query(client):
    """The gauge comes from one GROUP BY; checked here against a count per status."""
    _insert_jobs([{"status": s} for s in JobStatus for _ in range(list(JobStatus).index(s) + 1)])
    samples = scrape(client)
    with new_session() as session:
        for status in JobStatus:
            count = session.query(Job).filter(Job.status == status).count()
            assert value(samples, "qforge_jobs", status=status.value) == count == list(JobStatus).index(status) + 1
