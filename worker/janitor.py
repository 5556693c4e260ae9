"""The artifact sweep on a worker's timer: deletes the artifacts of jobs past the retention
setting (`artifact_retention_days`) and the leftovers of uploads that never completed.
Every worker runs it; two sweeping at once only delete the same files twice."""

from __future__ import annotations

import logging

from celery import bootsteps

from app.core.config import get_settings

log = logging.getLogger(__name__)


def sweep_artifacts() -> None:
    from app.artifacts import sweep_expired

    try:
        sweep_expired(get_settings())
    except Exception:  # an outage of the database or the store must not stop the timer
        log.exception("artifact sweep failed; trying again at the next interval")


class ArtifactJanitor(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref = None

    def start(self, worker) -> None:
        interval = get_settings().artifact_sweep_interval_s
        worker.timer.call_after(1.0, sweep_artifacts, priority=0)  # once soon after start
        self.timer_ref = worker.timer.call_repeatedly(interval, sweep_artifacts, priority=0)

    def stop(self, worker) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None
