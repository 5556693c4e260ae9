"""Delivering webhook events, from a thread in each worker's main process.

Not a task in the worker's pool: that pool runs one quantization job per process
(concurrency 1 by default, each holding a whole model), so an event queued there would wait
behind every job ahead of it, for hours. A dispatcher thread beside the pool sends events
as soon as they are due, whatever the pool is doing, and on every broker.

The database holds all state, so nothing is lost when a worker dies. Each job with a
callback URL has its webhook row from submission on; the row becomes due once the job has
finished, however it finished (worker, API cancel, reaper). A dispatcher claims one attempt
with a conditional UPDATE that moves `attempts` on (a fencing token, as for jobs) and sets
a lease; a worker that dies mid-attempt leaves the event due again when the lease ends, and
any worker's dispatcher sends it. Delivery is therefore at least once: receivers
de-duplicate by event id.

Retries: connection errors, timeouts, 5xx, 408 and 429 are retried with exponential
backoff (`webhook_backoff_s` doubled each time, ±20 % jitter so receivers recovering from
an outage are not hit all at once, at least a 429 or 503's Retry-After); any other answer
below 200 or from 300 up (a redirect, a 4xx: the receiver refuses, and will again) and an
address the policy refuses end the delivery as failed. Nothing here ever writes the job.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version

from celery import bootsteps
from sqlalchemy import func, or_, select, update

from app import webhooks
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.models import TERMINAL, Job, WebhookDelivery, WebhookState, utcnow
from qforge.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, signature_header
from worker import webhook_http

log = logging.getLogger(__name__)

BATCH = 32  # events claimed per round; the rest are due at the next
SENDERS = 4  # attempts in flight at once, so one slow receiver does not hold up the others
LEASE_MARGIN_S = 30.0  # beyond the attempt's timeout, before another worker may take it over
MAX_RETRY_AFTER_S = 3600.0
RETRY_STATUSES = frozenset({408, 429})
USER_AGENT = f"qforge-webhooks/{version('qforge')}"


@dataclass(frozen=True)
class Attempt:
    event_id: str
    job_id: str
    number: int  # 1 for the first
    url: str
    event_type: str
    body: bytes


@dataclass(frozen=True)
class Outcome:
    status: int | None = None  # the receiver's answer; None when there was none
    error: str | None = None  # why it did not deliver
    retry: bool = False
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def backoff_s(attempt: int, settings: Settings, rng: random.Random | None = None) -> float:
    """The wait after failed attempt `attempt` (1, 2, ...): base, 2 base, 4 base, ... ±20 %."""
    return settings.webhook_backoff_s * 2 ** (attempt - 1) * (rng or random).uniform(0.8, 1.2)


# --------------------------------------------------------------------------------------
# state, in the database
# --------------------------------------------------------------------------------------
def due(now: dt.datetime, limit: int = BATCH) -> list[tuple[WebhookDelivery, Job]]:
    """Undelivered events of finished jobs whose next attempt is due, oldest first."""
    with session_scope() as session:
        query = (
            select(WebhookDelivery, Job)
            .join(Job, Job.id == WebhookDelivery.job_id)
            .where(
                WebhookDelivery.state == WebhookState.PENDING,
                Job.status.in_(TERMINAL),
                or_(WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.next_attempt_at <= now),
            )
            .order_by(func.coalesce(WebhookDelivery.next_attempt_at, WebhookDelivery.created_at))
            .limit(limit)
        )
        return [(delivery, job) for delivery, job in session.execute(query).all()]


def _settle(session, event_id: str, seen: int, **values) -> bool:
    """Write a pending delivery if its attempts are still `seen` (no other run moved it on)."""
    return session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == event_id, WebhookDelivery.state == WebhookState.PENDING,
               WebhookDelivery.attempts == seen)
        .values(**values)
    ).rowcount == 1


def claim(delivery: WebhookDelivery, job: Job, settings: Settings, now: dt.datetime) -> Attempt | None:
    """Take the next attempt of a due event; None when another worker took it first, or when
    it has no attempts left (a worker died during the last one: it is failed here)."""
    with session_scope() as session:
        if delivery.attempts >= settings.webhook_max_attempts:
            reason = f"gave up: the worker sending attempt {delivery.attempts} stopped before it finished"
            _settle(session, delivery.id, delivery.attempts, state=WebhookState.FAILED, next_attempt_at=None,
                    last_error=reason)
            return None
        if delivery.body is None:  # the first attempt fixes the event
            event_type, body = webhooks.build_event(job, delivery.id, settings, now)
        else:
            event_type, body = delivery.event_type or f"job.{job.status.value}", delivery.body.encode()
        lease = now + dt.timedelta(seconds=settings.webhook_timeout_s + LEASE_MARGIN_S)
        taken = _settle(
            session, delivery.id, delivery.attempts,
            attempts=delivery.attempts + 1, last_attempt_at=now, next_attempt_at=lease,
            event_type=event_type, body=body.decode(),
        )
    if not taken:
        return None
    return Attempt(delivery.id, job.id, delivery.attempts + 1, job.callback_url or "", event_type, body)


def record(attempt: Attempt, outcome: Outcome, settings: Settings, now: dt.datetime | None = None) -> WebhookState:
    """Store an attempt's outcome; returns the delivery's state after it."""
    now = now or utcnow()
    values: dict = {"last_status": outcome.status, "last_error": outcome.error}
    if outcome.delivered:
        values |= {"state": WebhookState.DELIVERED, "delivered_at": now, "next_attempt_at": None}
    elif outcome.retry and attempt.number < settings.webhook_max_attempts:
        wait = backoff_s(attempt.number, settings)
        if outcome.retry_after_s is not None:
            wait = max(wait, min(outcome.retry_after_s, MAX_RETRY_AFTER_S))
        values |= {"state": WebhookState.PENDING, "next_attempt_at": now + dt.timedelta(seconds=wait)}
    else:
        if outcome.retry:
            values["last_error"] = f"gave up after {attempt.number} attempts: {outcome.error}"
        values |= {"state": WebhookState.FAILED, "next_attempt_at": None}
    with session_scope() as session:
        if not _settle(session, attempt.event_id, attempt.number, **values):
            log.warning("event %s: attempt %d outlived its lease; its outcome is not recorded",
                        attempt.event_id, attempt.number)
    return values["state"]


# --------------------------------------------------------------------------------------
# sending
# --------------------------------------------------------------------------------------
def headers(attempt: Attempt, secret: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_ID_HEADER: attempt.event_id,
        "X-Qforge-Event-Type": attempt.event_type,
        "X-Qforge-Delivery-Attempt": str(attempt.number),
        SIGNATURE_HEADER: signature_header(secret, attempt.body),  # signed now: t is this attempt's time
    }


def send(attempt: Attempt, settings: Settings) -> Outcome:
    """One attempt; never raises."""
    try:
        allowed = lambda address: webhooks.address_allowed(address, settings)  # noqa: E731
        answer = webhook_http.post(attempt.url, headers(attempt, webhooks.webhook_secret(settings)), attempt.body,
                                   allowed, settings.webhook_timeout_s)
    except webhook_http.TargetNotAllowed as exc:
        return Outcome(error=f"not sent: {exc}")
    except Exception as exc:  # connection refused, timeouts, a broken answer: the receiver may recover
        return Outcome(error=webhook_http.describe(exc), retry=True)
    if 200 <= answer.status < 300:
        return Outcome(status=answer.status)
    error = f"HTTP {answer.status}" + (f": {answer.body}" if answer.body else "")
    retry = answer.status >= 500 or answer.status in RETRY_STATUSES
    return Outcome(status=answer.status, error=error, retry=retry, retry_after_s=answer.retry_after_s)


def _attempt(delivery: WebhookDelivery, job: Job, settings: Settings) -> bool:
    """Claim, send and record one attempt; False when there was none to make."""
    # claimed only now, as it starts: a lease taken for the whole batch up front could run
    # out while the attempt waited behind slow receivers
    attempt = claim(delivery, job, settings, utcnow())
    if attempt is None:
        return False
    outcome = send(attempt, settings)
    state = record(attempt, outcome, settings)
    log.log(logging.INFO if outcome.delivered else logging.WARNING, "job %s: webhook %s (%s) attempt %d: %s, %s",
            attempt.job_id, attempt.event_id, attempt.event_type, attempt.number,
            outcome.status if outcome.delivered else outcome.error, state.value)
    return True


def dispatch_due(settings: Settings | None = None) -> int:
    """Send every due event once (at most BATCH); returns how many attempts were made."""
    settings = settings or get_settings()
    pending = due(utcnow())
    if len(pending) <= 1:
        return sum(_attempt(delivery, job, settings) for delivery, job in pending)
    with ThreadPoolExecutor(max_workers=min(SENDERS, len(pending)), thread_name_prefix="webhook") as pool:
        return sum(pool.map(lambda pair: _attempt(*pair, settings), pending))


def run_dispatcher(stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        try:
            dispatch_due()
        except Exception:  # a database outage must not end the thread; the events stay due
            log.exception("webhook dispatch failed; trying again in %.1f s", interval_s)


class WebhookDispatcher(bootsteps.StartStopStep):
    """Worker bootstep: the dispatcher thread, from worker start to worker stop."""

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, worker) -> None:
        settings = get_settings()
        if settings.webhook_secret is None and not settings.database_url.startswith("sqlite"):
            log.warning("QFORGE_WEBHOOK_SECRET is not set: webhooks are signed with %s/webhook.secret; "
                        "workers that do not share that folder must be given one secret", settings.data_dir)
        self.stop_event.clear()
        self.thread = threading.Thread(target=run_dispatcher, args=(self.stop_event, settings.webhook_poll_interval_s),
                                       name="webhook-dispatcher", daemon=True)
        self.thread.start()

    def stop(self, worker) -> None:
        self.stop_event.set()
        if self.thread is not None:
            # an attempt in flight ends within its timeout; past that its lease lets another worker retry it
            self.thread.join(timeout=get_settings().webhook_timeout_s + 1)
            self.thread = None
