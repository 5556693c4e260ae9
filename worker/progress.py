"""The progress callback a worker hands to `quantcore.job.run_job`.

quantcore calls it many times a second (per layer, per evaluation window). It writes the
job row at most twice a second, and always on a stage change, and that write also reads
`cancel_requested`, so a cancellation stops the job at its next progress call. A separate
thread keeps the heartbeat going when progress calls are far apart (loading a large model,
one slow layer), so a long step is not mistaken for a lost worker.

The job's log gets a line when a stage starts and one per `note`, not the throttled layer
updates between them (app/joblog.py says why).
"""

from __future__ import annotations

import logging
import threading
import time

from quantcore.job import STAGES, JobCancelled
from worker import state

log = logging.getLogger(__name__)

MIN_WRITE_INTERVAL_S = 0.5


def overall_percent(stage: str, current: int, total: int) -> float:
    """Job percent with each stage an equal share; within a stage, current of total."""
    index = STAGES.index(stage) if stage in STAGES else 0
    fraction = min(max(current / total, 0.0), 1.0) if total > 0 else 0.0
    return round(100.0 * (index + fraction) / len(STAGES), 2)


class ProgressReporter:
    """Use as a context manager around `run_job`: it runs the heartbeat thread meanwhile."""

    def __init__(self, job_id: str, attempt: int, heartbeat_interval_s: float) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.heartbeat_interval_s = heartbeat_interval_s
        self._stage: str | None = None
        self._logged_stage: str | None = None  # the last stage whose start is in the job's log
        self._position: tuple[str, int, int] = ("load", 0, 0)
        self._last_write = 0.0
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> ProgressReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def __call__(self, stage: str, current: int, total: int, message: str = "") -> None:
        self._check_claim()  # also on throttled calls: a taken-over run stops at once
        self._position = (stage, current, total)
        if stage == self._stage and time.monotonic() - self._last_write < MIN_WRITE_INTERVAL_S:
            return
        self._write(stage, current, total, message, None)

    def note(self, message: str) -> None:
        """Show a message at the current position (a step after quantcore's last report,
        such as an upload), written now whatever the throttle says, and logged; a
        cancellation still stops the job here."""
        stage, current, total = self._position
        self._write(stage, current, total, message, message)

    def _check_claim(self) -> None:
        if self._lost.is_set():
            raise state.LostClaim(f"job {self.job_id}: attempt {self.attempt} was taken over")

    def _write(self, stage: str, current: int, total: int, message: str, log_line: str | None) -> None:
        self._check_claim()
        self._stage, self._last_write = stage, time.monotonic()
        if log_line is None and stage != self._logged_stage:
            self._logged_stage = stage
            log_line = f"{stage} started" + (f": {message}" if message else "")
        percent = overall_percent(stage, current, total)
        if state.record_progress(self.job_id, self.attempt, stage, current, total, percent, message, log_line):
            raise JobCancelled(f"job {self.job_id} cancelled by request")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                if not state.heartbeat(self.job_id, self.attempt):
                    self._lost.set()
                    return
            except Exception:  # a database blip: the next beat may succeed, before the timeout
                log.exception("job %s: heartbeat failed", self.job_id)
