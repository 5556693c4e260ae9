"""The Celery application: configuration, and the hooks a worker process runs at start.

State lives in the database, not in Celery: results are ignored, and a job's message only
carries its id. Messages are acknowledged after the task returns (`acks_late`) and put back
when a pool process dies (`reject_on_worker_lost`), so a lost worker never loses a job.

    celery -A worker.celery_app worker --pool=prefork --concurrency=1 --loglevel=INFO
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from celery import Celery, signals
from kombu.utils.url import maybe_sanitize_url

from app.core.config import Settings, get_settings, is_sqlite_broker
from app.core.sqlite_writes import QueuedWritesConnection
from worker.janitor import Janitor
from worker.reaper import JobReaper, QueuedJobResender
from worker.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)

RUN_JOB_TASK = "worker.tasks.run_quantization_job"
JOB_QUEUE = "qforge.jobs"
# `qforge serve` sets this to a file the worker creates once it consumes, to know it started.
READY_FILE_ENV = "QFORGE_WORKER_READY_FILE"


class BrokerSQLiteConnection(QueuedWritesConnection):
    """The embedded broker's SQLite connections, in WAL mode with synchronous=NORMAL as the
    service's own database (app/core/db.py). kombu's SQL transport opens its engine with
    SQLite's defaults, a rollback journal and an fsync on every commit, and publishing a
    job's message was then most of a submission's time. A message lost to a power cut is
    not a lost job: workers send every queued job's message again when they connect
    (worker.reaper). The process's writers queue for the file as the database's do
    (app/core/sqlite_writes.py)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.execute("PRAGMA journal_mode=WAL")  # kept in the file: a no-op once set
        self.execute("PRAGMA synchronous=NORMAL")


def transport_options(broker_url: str) -> dict:
    """Broker-specific options: what suits one transport is an error for another."""
    scheme = broker_url.split("://", 1)[0]
    if is_sqlite_broker(broker_url):
        # Handed to create_engine, then sqlite3.connect: wait for the other process's write
        # instead of failing.
        return {"connect_args": {"timeout": 30, "factory": BrokerSQLiteConnection}}
    if scheme in ("redis", "rediss"):
        # Redis re-delivers an unacknowledged message after this long, and a job may run for
        # hours; lost jobs are recovered through heartbeats (worker.reaper) instead.
        return {"visibility_timeout": 24 * 3600}
    return {}


def create_celery(settings: Settings) -> Celery:
    app = Celery("qforge", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a job takes minutes: never hold one back behind another
        task_ignore_result=True,
        worker_redirect_stdouts_level="INFO",  # library progress bars on stderr are not warnings
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=JOB_QUEUE,
        worker_concurrency=settings.worker_concurrency,
        # A job holds a whole model (and a CUDA context): a fresh pool process per job
        # hands all of that memory back.
        worker_max_tasks_per_child=1,
        broker_transport_options=transport_options(settings.broker_url),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 2},
    )
    app.steps["worker"].add(JobReaper)
    app.steps["worker"].add(Janitor)
    app.steps["worker"].add(WebhookDispatcher)
    app.steps["consumer"].add(QueuedJobResender)
    return app


celery_app = create_celery(get_settings())


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _format_logs(logger: logging.Logger, **_) -> None:
    """Celery sets up the worker's log handlers (level, stdout redirection); the lines take
    the API's format (QFORGE_LOG_FORMAT), with the job_id bound by the task."""
    from app import logctx

    for handler in logger.handlers:
        handler.setFormatter(logctx.formatter(get_settings().log_format))


@signals.worker_init.connect
def _prepare_worker(**_) -> None:
    """Main worker process, before the pool forks."""
    from app.core.db import dispose_engines, migrate

    settings = get_settings()
    migrate()
    dispose_engines()  # the pool processes open their own connections
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    from app.artifact_store import store_for

    store_for(settings).prepare()  # a bucket that is missing is created; an unreachable store stops the worker here
    # Imported once here so each pool process forks with torch and transformers loaded,
    # instead of importing them again for every job.
    import quantcore.job  # noqa: F401


@signals.worker_process_init.connect
def _prepare_pool_process(**_) -> None:
    from app.core.db import dispose_engines

    dispose_engines(close=False)  # connections inherited through fork belong to the parent
    from app.artifact_store import forget_stores

    forget_stores()  # likewise the object store's
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        # Jobs running side by side share the machine's cores instead of oversubscribing them.
        cores = len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, cores // get_settings().worker_concurrency))


@signals.worker_ready.connect
def _announce_ready(**_) -> None:
    settings = get_settings()
    urls = (maybe_sanitize_url(settings.database_url), maybe_sanitize_url(settings.broker_url))
    log.info("qforge worker ready: database %s, broker %s", *urls)
    if path := os.environ.get(READY_FILE_ENV):
        Path(path).touch()
