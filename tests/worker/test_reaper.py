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
    for job_id in (retry, exhausted):  # what the lost runs left: a half-written artifact, an archive
        (settings.work_dir / job_id / "artifact").mkdir(parents=True)
        (settings.work_dir / job_id / "artifact" / "model.safetensors").write_bytes(b"half")
        (settings.artifact_dir / f"{job_id}.tar").write_bytes(b"stored just before the worker died")

    reaper.reap_lost_jobs()

    assert sent == [("worker.tasks.run_quantization_job", [retry])]
    assert load_job(retry).status == JobStatus.QUEUED
    assert load_job(exhausted).status == JobStatus.FAILED
    assert "gave up after 2 attempts" in load_job(exhausted).error
    assert load_job(alive).status == JobStatus.RUNNING
    # a job given up on keeps no files; one requeued keeps them until its next run starts afresh
    assert not (settings.work_dir / exhausted).exists() and not (settings.artifact_dir / f"{exhausted}.tar").exists()
    assert (settings.work_dir / retry).exists()


def test_the_reaper_logs_a_retry_and_giving_up(new_job, settings, monkeypatch):
    from app import joblog
    from app.core.db import session_scope

    monkeypatch.setattr("worker.celery_app.celery_app.send_task", lambda name, args, task_id: None)
    stale = utcnow() - dt.timedelta(seconds=120)
    retry = new_job(status=JobStatus.RUNNING, attempts=1, heartbeat_at=stale, progress_stage="quantize")
    exhausted = new_job(status=JobStatus.RUNNING, attempts=2, heartbeat_at=stale, progress_stage="evaluate")

    reaper.reap_lost_jobs()

    with session_scope() as session:
        [requeued] = joblog.read(session, retry)
        [failed] = joblog.read(session, exhausted)
    assert (requeued.level, requeued.stage, requeued.attempt) == ("warning", "quantize", 1)
    assert requeued.message.startswith("the worker running attempt 1 stopped responding") and "requeued" in requeued.message
    assert (failed.level, failed.stage, failed.attempt) == ("error", "evaluate", 2)
    assert failed.message.startswith("failed: ") and "gave up after 2 attempts" in failed.message
    # the requeued job's next run says which attempt it is
    from worker import state

    assert state.claim(retry, settings).attempt == 2
    with session_scope() as session:
        restarted = joblog.read(session, retry, after=requeued.id)
    assert [(r.message, r.attempt) for r in restarted] == [(f"restarted: attempt 2 of {settings.max_job_attempts}", 2)]


def test_the_reapers_log_lines_carry_each_jobs_id(new_job, settings, monkeypatch, json_log):
    monkeypatch.setattr("worker.celery_app.celery_app.send_task", lambda name, args, task_id: None)
    stale = utcnow() - dt.timedelta(seconds=120)
    jobs = {new_job(status=JobStatus.RUNNING, attempts=1, heartbeat_at=stale) for _ in range(2)}

    reaper.reap_lost_jobs()

    lines = [line for line in json_log() if line["logger"] == "worker.reaper"]
    assert len(lines) == 2 and {line["job_id"] for line in lines} == jobs
    assert all(line["message"].startswith(f"job {line['job_id']}: worker lost") for line in lines)


def test_queued_jobs_are_sent_again_when_the_worker_connects(new_job, settings, monkeypatch):
    sent = []
    monkeypatch.setattr("worker.celery_app.celery_app.send_task", lambda name, args, task_id: sent.append((name, args, task_id)))
    first, second = new_job(), new_job()
    new_job(status=JobStatus.RUNNING, attempts=1, heartbeat_at=utcnow())  # the reaper's, not this
    new_job(status=JobStatus.SUCCEEDED)

    reaper.resend_queued_jobs()

    assert sorted(sent) == sorted(("worker.tasks.run_quantization_job", [j], j) for j in (first, second))


def test_the_resender_is_a_consumer_step_so_it_runs_again_after_the_broker_returns():
    from worker.celery_app import celery_app

    assert reaper.QueuedJobResender in celery_app.steps["consumer"]
