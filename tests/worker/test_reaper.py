import datetime as dt

from app.models import JobStatus, utcnow
from worker import reaper


def test_lost_jobs_are_requeued_or_failed_and_live_ones_left_alone(new_job, load_job, settings, monkeypatch):
    sent = []
    monkeypatch.setattr("worker.celery_app.celery_app.send_task", lambda name, args, task_id: sent.append((name, args)))
    stale = utcnow() - dt.timedelta(seconds=120)
    retry = new_job(status=JobStatus.RUNNING, attempts=1, heartbeat_at=stale)
    exhausted = new_job(status=JobStatus.RUNNING, attempts=2, heartbeat_at=stale)
    alive = new_job(status=JobStatus.RUNNING, attempts=1, heartbeat_at=utcnow())

    reaper.reap_lost_jobs()

    assert sent == [("worker.tasks.run_quantization_job", [retry])]
    assert load_job(retry).status == JobStatus.QUEUED
    assert load_job(exhausted).status == JobStatus.FAILED
    assert "gave up after 2 attempts" in load_job(exhausted).error
    assert load_job(alive).status == JobStatus.RUNNING
