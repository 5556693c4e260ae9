"""Sending jobs to the workers through the Celery broker, and checking that it answers.

The broker URL is read from the settings on every call rather than fixed when the Celery
app is imported, so the API always talks to the broker it is configured for.
"""

from __future__ import annotations

from kombu import pools

from app.core.config import get_settings
from worker.celery_app import JOB_QUEUE, RUN_JOB_TASK, celery_app, transport_options


def broker_connection():
    """A new connection to the configured broker, with its transport's options."""
    url = get_settings().broker_url
    return celery_app.connection_for_write(url, transport_options=transport_options(url))


def enqueue(job_id: str) -> None:
    """Publish the job's message; raises when the broker cannot take it (after a few retries).

    Through kombu's producer pool for the broker's URL: a pooled connection has declared the
    job queue once, where a new one declares it again (on the SQL transport a query and a
    count of the queue's rows) and opens its own connection, on every submission."""
    pool = pools.producers[broker_connection()]  # one pool per distinct broker URL and options
    with pool.acquire(block=True, timeout=30) as producer:
        celery_app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id, producer=producer, retry=True)


def check_broker() -> None:
    """Raises when the broker is unreachable: declaring the job queue is a real round trip on
    every transport (for the SQL transport it is a query; for Redis, a command)."""
    queue_depth()


def queue_depth() -> int:
    """Messages waiting in the job queue, not counting those a worker has taken and not yet
    acknowledged (the SQL transport's visible rows; Redis's list lengths over the priority
    steps). Raises when the broker is unreachable."""
    with broker_connection() as connection:
        connection.ensure_connection(max_retries=1)
        channel = connection.default_channel
        return channel.queue_declare(queue=JOB_QUEUE, durable=True, auto_delete=False).message_count
