"""Recovery of jobs whose worker was lost (killed, out of memory, machine gone).

A running job's worker writes a heartbeat every few seconds. When it stops for longer than
`job_heartbeat_timeout`, the job is put back in the queue, or failed with the reason once
it has used `max_job_attempts`, so it is never left `running` forever. Every worker checks
periodically, from a timer in its main process.

A queued job can lose its message too: a broker restarted without its data, or a worker
killed while holding a message it had taken (the embedded SQL transport never gives such a
message back). So each time a worker connects to the broker, at start and again after
losing it, it sends every queued job's message again. A job that still had its message
then has two, which is harmless: `state.claim` runs a job once.
"""

from __future__ import annotations

import logging

from celery import bootsteps

from app import logctx
from app.core.config import get_settings

log = logging.getLogger(__name__)


def reap_lost_jobs() -> None:
    from worker import state
    from worker.celery_app import RUN_JOB_TASK, celery_app
    from worker.tasks import discard_files

    settings = get_settings()
    try:
        lost = state.lost_jobs(settings)
    except Exception:  # a database outage must not stop the worker's timer; try again next time
        log.exception("could not look for lost jobs")
        return
    for job in lost:
        with logctx.bound(job_id=job.id):  # its lines carry the id as a field too
            try:
                if state.may_retry(job, settings):
                    # Sent before the row says queued: a job must never sit queued with no message.
                    # If a worker takes the message first, its claim moves the attempt on and the
                    # requeue below no longer matches the row.
                    celery_app.send_task(RUN_JOB_TASK, args=[job.id], task_id=job.id)
                    state.mark_requeued(job, settings)
                    log.warning("job %s: worker lost during attempt %d, requeued", job.id, job.attempts)
                else:
                    if state.abandon(job, settings):
                        discard_files(settings, job.id)
                    log.warning("job %s: worker lost during attempt %d, not retried", job.id, job.attempts)
            except Exception:
                log.exception("job %s: could not recover it from its lost worker", job.id)


def resend_queued_jobs() -> None:
    from worker import state
    from worker.celery_app import RUN_JOB_TASK, celery_app

    try:
        queued = state.queued_job_ids()
    except Exception:  # the database may be the thing that is down; the reaper covers running jobs
        log.exception("could not look for queued jobs to send again")
        return
    for job_id in queued:
        try:
            celery_app.send_task(RUN_JOB_TASK, args=[job_id], task_id=job_id)
        except Exception:
            log.exception("job %s: could not send its message again", job_id)
            return
    if queued:
        log.info("sent the messages of %d queued job(s) again, in case the broker lost them", len(queued))


class QueuedJobResender(bootsteps.StartStopStep):
    """Consumer bootstep: `resend_queued_jobs` whenever the consumer (re)connects."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, consumer) -> None:
        resend_queued_jobs()


class JobReaper(bootsteps.StartStopStep):
    """Worker bootstep running `reap_lost_jobs` now and then on the worker's timer thread."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.timer_ref = None

    def start(self, worker) -> None:
        interval = max(1.0, get_settings().job_heartbeat_timeout / 2)
        self.timer_ref = worker.timer.call_repeatedly(interval, reap_lost_jobs, priority=10)

    def stop(self, worker) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None
