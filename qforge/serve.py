"""`qforge serve`: the API in the foreground and a real Celery worker as its child.

The worker starts first, and the API only once the worker consumes jobs; a worker that
cannot start stops serve with a non-zero exit. A worker that dies later (killed, out of
memory) is started again after a backoff, as a process supervisor would: its interrupted
job is recovered from its heartbeat (worker.reaper). Only when `MAX_FAILED_STARTS` starts
in a row fail does serve give up and stop with a non-zero exit. On SIGINT or SIGTERM the
API shuts down, then the worker: warm first (it may finish its job), cold after a grace
period (the interrupted job's message goes back to the queue and it runs again later).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from app.core.config import Settings
from app.core.db import migrate

log = logging.getLogger("qforge.serve")

WORKER_START_TIMEOUT_S = 180
WARM_STOP_GRACE_S = 10
COLD_STOP_GRACE_S = 10
RESTART_BACKOFF_S = (1, 2, 4, 8, 15)  # before each start after a death; the last one repeats
MAX_FAILED_STARTS = 5  # starts in a row that never became ready before serve gives up
HEALTHY_AFTER_S = 30  # a worker that lived this long resets the backoff


class _Stop(Exception):
    """SIGINT or SIGTERM arrived."""


def _raise_stop(signum, _frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve(settings: Settings, with_worker: bool = True) -> int:
    import uvicorn

    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    migrate()
    _bootstrap_key(settings)
    worker = WorkerSupervisor(settings) if with_worker else None
    try:
        if worker is not None and not worker.start():
            return 1
        import app.main  # noqa: F401  the API and what it imports (torch among them), for the freeze

        # What is imported now lives as long as the process: frozen, the collector's full passes
        # skip it. Unfrozen, a full pass walked its ~260k objects for 100-200 ms, a pause that
        # every request in flight waited out (most of the slowest submissions under load).
        gc.freeze()
        # log_config=None: uvicorn's lines go through the root logger's format (QFORGE_LOG_FORMAT,
        # set up by the CLI); no access log: app/middleware.py logs each request with more.
        config = uvicorn.Config(
            "app.main:app", host=settings.host, port=settings.port, timeout_graceful_shutdown=5,
            log_config=None, access_log=False,
        )
        server = uvicorn.Server(config)
        if worker is not None:
            threading.Thread(target=worker.supervise, args=(server,), name="worker-supervisor", daemon=True).start()
        # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises them: _raise_stop.
        server.run()
        return 1 if worker is not None and worker.gave_up.is_set() else 0
    except _Stop as stop:
        log.info("%s received, stopping", stop)
        return 0
    finally:
        if worker is not None:
            # The stop sequence is bounded (warm, then cold, then SIGKILL); a second Ctrl-C
            # must not cut it short and leave the worker behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            worker.stop()


class WorkerSupervisor:
    """The worker process, started again whenever it dies until serve stops."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen | None = None
        self.gave_up = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # no new worker is spawned once stop() has begun

    def start(self) -> bool:
        """Spawn a worker and wait until it consumes; False when it exits or times out first."""
        with self._lock:
            if self._stopping.is_set():
                return False
            self.process, ready = _spawn_worker(self.settings)
        if _wait_until_ready(self.process, ready):
            return True
        _stop_worker(self.process)  # one that timed out may still be running
        return False

    def supervise(self, server) -> None:
        """Thread body: wait for the worker to die, then start another after a backoff that
        grows while workers keep dying young. The workers it starts get SIGTERM when this
        thread ends (PR_SET_PDEATHSIG follows the thread that forked), which it only does
        once serve is stopping anyway."""
        short_lives = 0
        while True:
            ready_at = time.monotonic()
            code = self.process.wait()
            if self._stopping.is_set() or server.should_exit:
                return
            short_lives = short_lives + 1 if time.monotonic() - ready_at < HEALTHY_AFTER_S else 0
            failed_starts = 0
            while True:
                delay = RESTART_BACKOFF_S[min(short_lives + failed_starts, len(RESTART_BACKOFF_S) - 1)]
                log.error("the worker exited with code %s; starting another in %d s", code, delay)
                if self._stopping.wait(delay):
                    return
                if self.start():
                    break
                if self._stopping.is_set():
                    return
                code = self.process.returncode
                failed_starts += 1
                if failed_starts >= MAX_FAILED_STARTS:
                    log.error("the worker failed to start %d times in a row; stopping the API", failed_starts)
                    self.gave_up.set()
                    server.should_exit = True
                    return

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is not None:
            _stop_worker(process)


def _bootstrap_key(settings: Settings) -> None:
    """Make sure some key can use the service (app.tenants.bootstrap) and say where it is."""
    from app import tenants
    from app.core.db import session_scope

    with session_scope() as session:
        line = tenants.bootstrap(session, settings)
    if line:
        # a warning: shown however quiet the log is set, in the log's own format (QFORGE_LOG_FORMAT)
        log.warning("%s", line)


def _spawn_worker(settings: Settings) -> tuple[subprocess.Popen, Path]:
    from qforge.cli import worker_command
    from worker.celery_app import READY_FILE_ENV

    ready = settings.data_dir / f"worker-{os.getpid()}.ready"
    ready.unlink(missing_ok=True)
    command = worker_command(settings.worker_concurrency)
    log.info("starting the worker: %s", " ".join(command[2:]))
    worker = subprocess.Popen(
        command,
        env={**os.environ, READY_FILE_ENV: str(ready)},
        # Its own session: a Ctrl-C in the terminal reaches serve alone, which then stops
        # the worker in order instead of both racing to shut down.
        start_new_session=True,
        preexec_fn=functools.partial(_prepare_worker, settings.worker_nice),
    )
    return worker, ready


def _prepare_worker(nice: int) -> None:
    """In the child before exec.

    A lower CPU priority (QFORGE_WORKER_NICE, 10 by default): the API and the worker share
    this machine's cores, and a niced job gets the cycles the API leaves idle instead of half
    of them while clients wait. A niced worker preempted while it holds the embedded
    database's write lock keeps the API's writers waiting, but only for that short write's
    own time: measured with jobs running all through a load of 50 clients, the API's submit
    p99 was 155 ms at 10 against 691 ms at 0 (bench/RESULTS.md, runs B10 and B0). And on
    Linux, if serve is killed outright (SIGKILL), the kernel sends the worker SIGTERM, so no
    worker is left behind consuming jobs."""
    if nice:
        os.nice(nice)
        _nice_autogroup(nice)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _nice_autogroup(nice: int) -> None:
    """Where Linux groups the scheduling of each session (sched_autogroup, on in most
    distributions' kernels), a process's nice value only ranks it within its own session: the
    worker, a session of its own, would still get an equal share of the cores beside the
    API's session, however niced. The session's own nice value ranks it against the others."""
    try:
        with open("/proc/self/autogroup", "w") as autogroup:
            autogroup.write(str(nice))
    except OSError:  # no autogroups here (other systems, or a kernel without them): os.nice was enough
        pass


def _wait_until_ready(worker: subprocess.Popen, ready: Path) -> bool:
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while not ready.exists():
        if worker.poll() is not None:
            log.error("the worker exited with code %s while starting; see its log above", worker.returncode)
            return False
        if time.monotonic() > deadline:
            log.error("the worker did not become ready within %d s", WORKER_START_TIMEOUT_S)
            return False
        time.sleep(0.2)
    ready.unlink(missing_ok=True)
    log.info("worker ready (pid %d)", worker.pid)
    return True


def _stop_worker(worker: subprocess.Popen) -> None:
    steps = ((signal.SIGTERM, WARM_STOP_GRACE_S), (signal.SIGQUIT, COLD_STOP_GRACE_S), (signal.SIGKILL, None))
    for sig, grace in steps:
        if worker.poll() is not None:
            return
        log.info("stopping the worker (%s)", sig.name)
        worker.send_signal(sig)
        try:
            worker.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    worker.wait()
