"""The worker's log lines: Celery sets up its logging in the worker process; the lines
take QFORGE_LOG_FORMAT's format. Run in a fresh interpreter, as a worker starts."""

import json
import os
import subprocess
import sys

import pytest

EMIT = """
import logging
from worker.celery_app import celery_app
from app import logctx

celery_app.log.setup(loglevel="INFO")  # what `celery worker` does at start
with logctx.bound(job_id="j-42"):
    logging.getLogger("worker.tasks").info("job j-42: attempt 1 starting")
"""


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_celery_logging_takes_the_configured_format(settings, log_format):
    env = {**os.environ, "QFORGE_LOG_FORMAT": log_format}
    result = subprocess.run([sys.executable, "-c", EMIT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = [text for text in result.stderr.splitlines() if "attempt 1 starting" in text][-1]
    if log_format == "json":
        parsed = json.loads(line)
        assert (parsed["level"], parsed["logger"], parsed["job_id"]) == ("info", "worker.tasks", "j-42")
    else:
        assert line.endswith(" INFO worker.tasks: job j-42: attempt 1 starting job_id=j-42")


def test_the_embedded_broker_publishes_in_wal_mode_without_an_fsync_per_commit(settings):
    import sqlite3

    from app import queue

    queue.enqueue("job-wal-check")  # through the pooled producer, twice: the pool's connection again
    queue.enqueue("job-wal-check-2")
    broker_file = settings.data_dir / "broker.db"
    assert sqlite3.connect(broker_file).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    # SQLite's own view of the connections kombu opened: NORMAL is 1 (FULL, the default, is 2)
    from kombu.transport.sqlalchemy import Channel

    engine, _ = Channel._engines[f"sqlite:///{broker_file}"]
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1
        payloads = connection.exec_driver_sql("SELECT payload FROM kombu_message").scalars().all()
    assert [json.loads(p)["headers"]["id"] for p in payloads] == ["job-wal-check", "job-wal-check-2"]


def test_delivered_messages_are_pruned_and_waiting_ones_kept_in_order(settings):
    import sqlite3

    from app import queue
    from worker.celery_app import JOB_QUEUE
    from worker.janitor import prune_delivered_messages

    sent = [f"job-{n}" for n in range(5)]
    for job_id in sent:
        queue.enqueue(job_id)
    with queue.broker_connection() as connection:
        channel = connection.default_channel
        taken = [channel._get(JOB_QUEUE)["headers"]["id"] for _ in range(2)]  # as a worker's poll takes them
    assert taken == sent[:2]

    assert prune_delivered_messages() == 2
    rows = sqlite3.connect(settings.data_dir / "broker.db").execute("SELECT payload, visible FROM kombu_message ORDER BY id")
    assert [(json.loads(payload)["headers"]["id"], visible) for payload, visible in rows] == [(j, 1) for j in sent[2:]]
    assert queue.queue_depth() == 3
    with queue.broker_connection() as connection:
        assert connection.default_channel._get(JOB_QUEUE)["headers"]["id"] == "job-2"
    assert prune_delivered_messages() == 1
