"""worker.webhooks: events of finished jobs POSTed to a real HTTP receiver on 127.0.0.1,
signed (checked with an HMAC computed here), retried by the rules, with every attempt's
outcome in the database and the job itself never touched."""

import datetime as dt
import hashlib
import hmac
import json
import random
import socket
import threading
import time

import pytest
from sqlalchemy import update

from app import crud
from app.core.config import get_settings
from app.core.db import new_session, session_scope
from app.models import DEFAULT_TENANT, Job, JobStatus, WebhookDelivery, WebhookState, utcnow
from qforge.webhooks import verify_webhook
from quantcore.job import JobRequest
from worker import webhooks

SECRET = "worker-test-secret"
PUBLIC = "https://qforge.example.test"


@pytest.fixture
def service_env():
    return {
        "QFORGE_JOB_HEARTBEAT_TIMEOUT": "30",
        "QFORGE_WEBHOOK_SECRET": SECRET,
        "QFORGE_WEBHOOK_BACKOFF_S": "0.5",
        "QFORGE_WEBHOOK_TIMEOUT_S": "1",
        "QFORGE_WEBHOOK_MAX_ATTEMPTS": "3",
        "QFORGE_PUBLIC_URL": PUBLIC,
    }


@pytest.fixture
def finished_job(settings):
    """A job with a callback, moved to a finished state as a worker (or the API) would."""

    def create(url: str, status: JobStatus = JobStatus.SUCCEEDED, **values) -> str:
        with new_session() as session:
            request = JobRequest(model="bundled:smollm2-135m", recipe="w4a16-rtn-g64")
            job, _ = crud.create_job(session, request, None, url, tenant_id=DEFAULT_TENANT)
        if status.terminal:
            values = {"finished_at": utcnow(), "started_at": utcnow(), "attempts": 1, **values}
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job.id).values(status=status, **values))
        return job.id

    return create


def load(job_id: str) -> tuple[Job, WebhookDelivery]:
    with new_session() as session:
        job = session.get(Job, job_id)
        return job, job.webhook


def make_due(job_id: str) -> None:
    """Skip the backoff wait (or a lease), as time passing would."""
    with session_scope() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                        .values(next_attempt_at=utcnow() - dt.timedelta(seconds=1)))


def independent_check(request: dict, secret: str = SECRET) -> int:
    """The documented signature, recomputed with hmac/hashlib; returns its timestamp."""
    fields = dict(item.split("=", 1) for item in request["headers"]["x-qforge-signature"].split(","))
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + request["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    return int(fields["t"])


SUCCEEDED = {
    "report": {"artifacts": [
        {"format": "qforge", "file": "J.tar", "sha256": "a" * 64, "bytes": 1234},
        {"format": "gguf", "file": "J.gguf.tar", "sha256": "b" * 64, "bytes": 99},
    ]},
    "artifact_path": "J.tar", "artifact_sha256": "a" * 64, "artifact_bytes": 1234,
}


def test_a_succeeded_job_is_posted_once_signed_with_its_event(finished_job, webhook_receiver):
    receiver = webhook_receiver([200])
    job_id = finished_job(receiver.url, **SUCCEEDED)
    assert webhooks.dispatch_due() == 1
    [request] = receiver.received()
    job, delivery = load(job_id)
    headers = request["headers"]
    assert request["path"] == "/hooks/qforge?tenant=t1"
    assert headers["content-type"] == "application/json" and headers["user-agent"].startswith("qforge-webhooks/")
    assert headers["x-qforge-event-id"] == delivery.id and headers["x-qforge-delivery-attempt"] == "1"
    assert abs(independent_check(request) - time.time()) < 5
    event = verify_webhook(SECRET, request["body"], headers["x-qforge-signature"])
    assert event["id"] == delivery.id and event["type"] == "job.succeeded" == headers["x-qforge-event-type"]
    assert event["job"]["id"] == job_id and event["job"]["status"] == "succeeded" and event["job"]["error"] is None
    assert dt.datetime.fromisoformat(event["job"]["finished_at"]) == job.finished_at
    assert abs(dt.datetime.fromisoformat(event["created_at"]) - utcnow()) < dt.timedelta(seconds=5)
    base = f"{PUBLIC}/v1/jobs/{job_id}"
    assert event["links"] == {"job": base, "report": f"{base}/report", "artifact": f"{base}/artifact"}
    assert event["artifacts"] == [
        {"format": "qforge", "sha256": "a" * 64, "bytes": 1234, "url": f"{base}/artifact"},
        {"format": "gguf", "sha256": "b" * 64, "bytes": 99, "url": f"{base}/artifact?format=gguf"},
    ]
    assert delivery.state == WebhookState.DELIVERED and delivery.attempts == 1 and delivery.last_status == 200
    assert delivery.delivered_at is not None and delivery.next_attempt_at is None and delivery.last_error is None
    assert delivery.body.encode() == request["body"]
    assert webhooks.dispatch_due() == 0 and len(receiver.received()) == 1  # delivered: never again


def test_a_500_is_retried_after_the_backoff_with_the_same_event(finished_job, webhook_receiver, settings):
    receiver = webhook_receiver([500, 200])
    job_id = finished_job(receiver.url, **SUCCEEDED)
    assert webhooks.dispatch_due() == 1
    _, delivery = load(job_id)
    assert (delivery.state, delivery.attempts, delivery.last_status) == (WebhookState.PENDING, 1, 500)
    assert delivery.last_error == "HTTP 500: no"
    wait = (delivery.next_attempt_at - delivery.last_attempt_at).total_seconds()
    assert 0.8 * settings.webhook_backoff_s <= wait <= 1.2 * settings.webhook_backoff_s
    assert webhooks.dispatch_due() == 0  # not due yet
    time.sleep(wait + 0.1)
    assert webhooks.dispatch_due() == 1
    first, second = receiver.received()
    _, delivery = load(job_id)
    assert (delivery.state, delivery.attempts, delivery.last_status) == (WebhookState.DELIVERED, 2, 200)
    assert first["body"] == second["body"] and first["headers"]["x-qforge-event-id"] == second["headers"]["x-qforge-event-id"]
    assert [r["headers"]["x-qforge-delivery-attempt"] for r in (first, second)] == ["1", "2"]
    for request in (first, second):
        independent_check(request)


def test_failed_and_cancelled_jobs_send_their_own_events(finished_job, webhook_receiver, settings):
    receiver = webhook_receiver([200])
    failed = finished_job(receiver.url, JobStatus.FAILED, error="ValueError: group_size 7 does not divide 576")
    queued = finished_job(receiver.url, JobStatus.QUEUED)
    with new_session() as session:
        assert crud.request_cancel(session, queued) == "cancelled"  # the API's transition, not a worker's
    assert webhooks.dispatch_due() == 2
    events = {e["job"]["id"]: e for e in (json.loads(r["body"]) for r in receiver.received())}
    assert events[failed]["type"] == "job.failed" and events[failed]["job"]["status"] == "failed"
    assert events[failed]["job"]["error"] == "ValueError: group_size 7 does not divide 576"
    assert events[queued]["type"] == "job.cancelled" and events[queued]["job"]["error"] is None
    for event in events.values():
        assert event["links"] == {"job": f"{PUBLIC}/v1/jobs/{event['job']['id']}"} and event["artifacts"] == []


def test_unfinished_jobs_send_nothing(finished_job, webhook_receiver):
    receiver = webhook_receiver([200])
    finished_job(receiver.url, JobStatus.QUEUED)
    finished_job(receiver.url, JobStatus.RUNNING, attempts=1, heartbeat_at=utcnow())
    assert webhooks.dispatch_due() == 0 and receiver.received() == []


@pytest.mark.parametrize("status, retried", [(400, False), (401, False), (404, False), (410, False), (301, False),
                                             (408, True), (429, True), (500, True), (502, True), (503, True)])
def test_which_answers_are_retried(finished_job, webhook_receiver, status, retried):
    receiver = webhook_receiver([status])
    job_id = finished_job(receiver.url)
    webhooks.dispatch_due()
    _, delivery = load(job_id)
    assert delivery.last_status == status and delivery.attempts == 1
    assert delivery.state == (WebhookState.PENDING if retried else WebhookState.FAILED)
    assert (delivery.next_attempt_at is not None) == retried


def test_retry_after_is_honoured(finished_job, webhook_receiver):
    receiver = webhook_receiver([429], headers={"Retry-After": "120"})
    job_id = finished_job(receiver.url)
    webhooks.dispatch_due()
    _, delivery = load(job_id)
    assert 119 <= (delivery.next_attempt_at - delivery.last_attempt_at).total_seconds() <= 121


def test_refused_connections_are_retried_until_the_attempts_run_out(finished_job, closed_port):
    job_id = finished_job(f"http://127.0.0.1:{closed_port}/hook", **SUCCEEDED)
    job_before, _ = load(job_id)
    for attempt in (1, 2, 3):
        assert webhooks.dispatch_due() == 1
        _, delivery = load(job_id)
        assert delivery.attempts == attempt and delivery.last_status is None
        assert "refused" in delivery.last_error.lower(), delivery.last_error
        make_due(job_id)
    assert delivery.state == WebhookState.FAILED and delivery.last_error.startswith("gave up after 3 attempts")
    assert webhooks.dispatch_due() == 0
    job, _ = load(job_id)  # a failing webhook never changes the job
    assert (job.status, job.error, job.updated_at) == (JobStatus.SUCCEEDED, None, job_before.updated_at)


def test_a_slow_receiver_times_out_and_is_retried(finished_job, webhook_receiver, settings):
    receiver = webhook_receiver([200], delay_s=settings.webhook_timeout_s + 2)
    job_id = finished_job(receiver.url)
    started = time.monotonic()
    webhooks.dispatch_due()
    assert time.monotonic() - started < settings.webhook_timeout_s + 1
    _, delivery = load(job_id)
    assert delivery.state == WebhookState.PENDING and "timed out" in delivery.last_error


def test_a_receiver_trickling_its_answer_is_cut_at_the_attempts_deadline(finished_job, settings):
    """One byte every 0.2 s keeps every read within its own timeout; the attempt still ends."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(0.2):
                    return
                connection.sendall(bytes([byte]))

    threading.Thread(target=trickle, daemon=True).start()
    job_id = finished_job(f"http://127.0.0.1:{server.getsockname()[1]}/hook")
    started = time.monotonic()
    webhooks.dispatch_due()
    elapsed = time.monotonic() - started
    stop.set()
    server.close()
    assert settings.webhook_timeout_s - 0.5 < elapsed < settings.webhook_timeout_s + 1
    _, delivery = load(job_id)
    assert delivery.state == WebhookState.PENDING and "timed out" in delivery.last_error


def test_an_address_the_policy_refuses_is_never_contacted(finished_job, webhook_receiver, monkeypatch):
    receiver = webhook_receiver([200])
    # submitted while loopback was allowed; by delivery time it no longer is (or the name moved)
    job_id = finished_job(receiver.url.replace("127.0.0.1", "localhost"))
    monkeypatch.setenv("QFORGE_WEBHOOK_ALLOW_LOOPBACK", "false")
    get_settings.cache_clear()
    webhooks.dispatch_due()
    _, delivery = load(job_id)
    assert receiver.received() == []
    assert delivery.state == WebhookState.FAILED and delivery.last_error.startswith("not sent: 'localhost' is at")


def test_an_attempt_lost_with_its_worker_is_sent_again_after_its_lease(finished_job, webhook_receiver, settings):
    receiver = webhook_receiver([200])
    job_id = finished_job(receiver.url)
    now = utcnow()
    [(delivery, job)] = webhooks.due(now)
    lost = webhooks.claim(delivery, job, settings, now)  # ... and the worker dies before sending
    assert lost.number == 1
    assert webhooks.dispatch_due() == 0  # leased
    make_due(job_id)  # the lease ran out
    assert webhooks.dispatch_due() == 1
    [request] = receiver.received()
    assert request["headers"]["x-qforge-delivery-attempt"] == "2" and request["body"] == lost.body
    _, delivery = load(job_id)
    assert delivery.state == WebhookState.DELIVERED and delivery.attempts == 2
    # the lost run's late outcome cannot overwrite the delivery
    webhooks.record(lost, webhooks.Outcome(error="late", retry=True), settings)
    assert load(job_id)[1].state == WebhookState.DELIVERED


def test_a_worker_lost_during_the_last_attempt_ends_the_delivery(finished_job, webhook_receiver, settings):
    job_id = finished_job(webhook_receiver([200]).url)
    with session_scope() as session:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                        .values(attempts=settings.webhook_max_attempts, body="{}", event_type="job.succeeded"))
    assert webhooks.dispatch_due() == 0
    _, delivery = load(job_id)
    assert delivery.state == WebhookState.FAILED and "stopped before it finished" in delivery.last_error


def test_two_dispatchers_never_take_the_same_attempt(finished_job, webhook_receiver, settings):
    finished_job(webhook_receiver([200]).url)
    now = utcnow()
    [(seen_by_a, job_a)] = webhooks.due(now)
    [(seen_by_b, job_b)] = webhooks.due(now)
    assert webhooks.claim(seen_by_a, job_a, settings, now) is not None
    assert webhooks.claim(seen_by_b, job_b, settings, now) is None


def test_the_backoff_doubles_from_the_base_with_jitter(settings, monkeypatch):
    monkeypatch.setenv("QFORGE_WEBHOOK_BACKOFF_S", "20")
    get_settings.cache_clear()
    production = get_settings()
    rng = random.Random(0)
    waits = [webhooks.backoff_s(n, production, rng) for n in range(1, 6)]
    for n, wait in enumerate(waits):
        assert 0.8 * 20 * 2**n <= wait <= 1.2 * 20 * 2**n
    assert 0.8 * 620 <= sum(waits) <= 1.2 * 620  # six attempts over about ten minutes


def test_the_worker_bootstep_sends_on_its_own(finished_job, webhook_receiver, monkeypatch):
    monkeypatch.setenv("QFORGE_WEBHOOK_POLL_INTERVAL_S", "0.1")
    get_settings.cache_clear()
    receiver = webhook_receiver([200])
    step = webhooks.WebhookDispatcher(None)
    step.start(None)
    try:
        job_id = finished_job(receiver.url)
        deadline = time.monotonic() + 10
        while not receiver.received() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        thread = step.thread
        step.stop(None)
    assert not thread.is_alive()
    assert len(receiver.received()) == 1 and load(job_id)[1].state == WebhookState.DELIVERED
