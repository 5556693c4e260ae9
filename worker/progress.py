"""The progress callback a worker hands to `quantcore.job.run_job`.

quantcore calls it many times a second (per layer, per evaluation window). It writes the
job row at most twice a second, and always on a stage change, and that write also reads
`cancel_requested`, so a cancellation stops the job at its next progress call. A separate
thread keeps the heartbeat going when progress calls are far apart (loading a large model,
one slow layer), so a long step is not mistaken for a lost worker.

That thread also reads `cancel_requested` every second. Progress calls can be far apart
(a slow evaluation window, loading, writing the artifact), so inside `interruptible()` it
raises `JobCancelled` in the job's thread at once, between two Python steps, wherever the
pipeline is. Never inside a database write: the thread raises it only while holding the
lock the job's thread holds for each write, so it lands before a write begins or after it
has ended.

A database outage does not fail the job: progress writes are skipped until it answers
again (the job's outcome is written with retries, in worker.state).

The job's log gets a line when a stage starts and one per `note`, not the throttled layer
updates between them (app/joblog.py says why).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from quantcore.job import STAGES, JobCancelled
from worker import state

log = logging.getLogger(__name__)

MIN_WRITE_INTERVAL_S = 0.5
CANCEL_POLL_S = 1.0


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
        self.cancelled = threading.Event()  # seen by either thread
        self._lock = threading.Lock()  # held by the job's thread for each write, by the other to interrupt it
        self._armed = False
        self._interrupted = False
        self._job_thread = 0
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> ProgressReporter:
        self._job_thread = threading.get_ident()
        self._thread.start()
        return self

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within the block, a cancellation raises JobCancelled in it within CANCEL_POLL_S."""
        with self._lock:
            self._armed = True
        try:
            yield
        finally:
            with self._lock:
                self._armed = False
                interrupted = self._interrupted
                if interrupted:
                    _raise_in_thread(self._job_thread, None)  # withdraw it, in case it is still pending
        if interrupted:
            raise JobCancelled(f"job {self.job_id} cancelled by request")

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def __call__(self, stage: str, current: int, total: int, message: str = "") -> None:
        self._check_claim()  # also on throttled calls: a taken-over run stops at once
        if self.cancelled.is_set():
            raise JobCancelled(f"job {self.job_id} cancelled by request")
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
        with self._lock:
            try:
                cancelled = state.record_progress(self.job_id, self.attempt, stage, current, total, percent, message, log_line)
            except state.DATABASE_DOWN as exc:
                log.warning("job %s: progress not written, the database did not answer: %s", self.job_id, exc.orig)
                return
        if cancelled:
            self.cancelled.set()
            raise JobCancelled(f"job {self.job_id} cancelled by request")

    def _beat(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_interval_s
        while not self._stop.wait(min(CANCEL_POLL_S, self.heartbeat_interval_s)):
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_interval_s
                    if not state.heartbeat(self.job_id, self.attempt):
                        self._lost.set()
                        return
                if not self.cancelled.is_set() and state.cancel_requested(self.job_id):
                    self.cancelled.set()
                    self._interrupt()
            except state.DATABASE_DOWN as exc:  # the next beat may succeed, before the timeout
                log.warning("job %s: heartbeat not written, the database did not answer: %s", self.job_id, exc.orig)
            except Exception:
                log.exception("job %s: heartbeat failed", self.job_id)

    def _interrupt(self) -> None:
        with self._lock:  # never while the job's thread writes: it holds the lock then
            if self._armed and not self._interrupted:
                self._interrupted = True
                _raise_in_thread(self._job_thread, JobCancelled)
                log.info("job %s: cancellation requested; interrupting it", self.job_id)


def _raise_in_thread(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Raise `exc_type` in that thread at its next Python step (None withdraws a pending one)."""
    exc = ctypes.py_object(exc_type) if exc_type is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc)
