"""Housekeeping on a worker's timer.

- The artifact sweep deletes the artifacts of jobs past the retention setting
  (`artifact_retention_days`) and the leftovers of uploads that never completed.
- On a SQL broker (the embedded default's), delivered messages are deleted. kombu's SQL
  transport never deletes a message: it marks it invisible when a worker takes it, and every
  poll, which holds the broker's write lock on SQLite, then walks past all of them to find
  the next visible one. A poll cost 1.6 ms with one delivered message and 6 ms with 5,000,
  every second, in the way of every submission's publish. No one reads an invisible message
  again: an unacknowledged one goes back to the queue as a new message (kombu's restore,
  or worker.reaper when its worker died).
Every worker runs both; two at once only delete the same things twice."""

from __future__ import annotations

import logging

from celery import bootsteps

from app.core.config import get_settings, is_sql_broker

log = logging.getLogger(__name__)


def sweep_artifacts() -> None:
    from app.artifacts import sweep_expired

    try:
        sweep_expired(get_settings())
    except Exception:  # an outage of the database or the store must not stop the timer
        log.exception("artifact sweep failed; trying again at the next interval")


BROKER_PRUNE_INTERVAL_S = 60.0


def prune_delivered_messages() -> int:
    """Delete the SQL broker's delivered messages; returns how many."""
    from app.queue import broker_connection

    try:
        with broker_connection() as connection:
            channel = connection.default_channel
            message = channel.message_cls
            deleted = channel.session.query(message).filter(message.visible.is_(False)).delete(synchronize_session=False)
            channel.session.commit()
            return deleted
    except Exception:  # a broker outage must not stop the timer
        log.exception("pruning the broker's delivered messages failed; trying again at the next interval")
        return 0


class Janitor(bootsteps.StartStopStep):
    """Worker bootstep: each chore once soon after start, then at its interval."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.timer_refs = []

    def start(self, worker) -> None:
        settings = get_settings()
        self._schedule(worker, settings.artifact_sweep_interval_s, sweep_artifacts)
        if is_sql_broker(settings.broker_url):
            self._schedule(worker, BROKER_PRUNE_INTERVAL_S, prune_delivered_messages)

    def _schedule(self, worker, interval_s: float, chore) -> None:
        worker.timer.call_after(1.0, chore, priority=0)
        self.timer_refs.append(worker.timer.call_repeatedly(interval_s, chore, priority=0))

    def stop(self, worker) -> None:
        for timer_ref in self.timer_refs:
            timer_ref.cancel()
        self.timer_refs.clear()
