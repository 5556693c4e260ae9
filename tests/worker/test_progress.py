import pytest

from app.models import JobStatus
from quantcore.job import JobCancelled
from worker import state
from worker.progress import ProgressReporter, overall_percent


def test_overall_percent_gives_each_stage_an_equal_share():
    assert overall_percent("load", 0, 1) == 0.0
    assert overall_percent("baseline", 1, 2) == 30.0
    assert overall_percent("export", 2, 2) == 100.0
    assert overall_percent("quantize", 5, 0) == 40.0


def test_writes_are_throttled_but_stage_changes_always_written(new_job, settings, monkeypatch):
    job_id = new_job()
    attempt = state.claim(job_id, settings).attempt
    writes = []
    real = state.record_progress
    monkeypatch.setattr(state, "record_progress", lambda *a: writes.append(a[2:5]) or real(*a))
    with ProgressReporter(job_id, attempt, heartbeat_interval_s=60) as progress:
        for i in range(200):
            progress("quantize", i, 200)
        progress("evaluate", 0, 4)
    assert writes == [("quantize", 0, 200), ("evaluate", 0, 4)]


def test_cancel_request_raises_job_cancelled(new_job, settings):
    from app.core.db import session_scope
    from app.crud import request_cancel

    job_id = new_job()
    attempt = state.claim(job_id, settings).attempt
    with ProgressReporter(job_id, attempt, heartbeat_interval_s=60) as progress:
        progress("load", 0, 1)
        with session_scope() as session:
            request_cancel(session, job_id)
        with pytest.raises(JobCancelled):
            progress("baseline", 0, 1)


def test_heartbeat_thread_beats_between_progress_calls(new_job, load_job, settings):
    import time

    job_id = new_job()
    attempt = state.claim(job_id, settings).attempt
    first = load_job(job_id).heartbeat_at
    with ProgressReporter(job_id, attempt, heartbeat_interval_s=0.05):
        time.sleep(0.3)
    job = load_job(job_id)
    assert job.status == JobStatus.RUNNING and job.heartbeat_at > first


def test_a_cancellation_interrupts_a_long_step_between_progress_calls(new_job, load_job, settings, monkeypatch):
    import time

    from app.core.db import session_scope
    from app.crud import request_cancel

    monkeypatch.setattr("worker.progress.CANCEL_POLL_S", 0.1)
    job_id = new_job()
    attempt = state.claim(job_id, settings).attempt
    with ProgressReporter(job_id, attempt, heartbeat_interval_s=60) as progress:
        progress("evaluate", 0, 4)
        with session_scope() as session:
            request_cancel(session, job_id)
        started = time.monotonic()
        with pytest.raises(JobCancelled), progress.interruptible():
            while time.monotonic() - started < 10:  # one long step: no progress call in it
                sum(range(1000))
        assert time.monotonic() - started < 2
        time.sleep(0.3)  # nothing is raised once outside the block
    assert load_job(job_id).status == JobStatus.RUNNING  # the task, not the reporter, records the outcome


def test_outside_interruptible_a_cancellation_waits_for_the_next_progress_call(new_job, settings, monkeypatch):
    import time

    from app.core.db import session_scope
    from app.crud import request_cancel

    monkeypatch.setattr("worker.progress.CANCEL_POLL_S", 0.05)
    job_id = new_job()
    attempt = state.claim(job_id, settings).attempt
    with ProgressReporter(job_id, attempt, heartbeat_interval_s=60) as progress:
        with session_scope() as session:
            request_cancel(session, job_id)
        time.sleep(0.3)  # e.g. the upload to the store: it must not stop halfway
        assert progress.cancelled.is_set()
        with pytest.raises(JobCancelled):
            progress.note("stored")


def test_a_database_outage_skips_progress_writes_instead_of_failing_the_job(new_job, settings, monkeypatch):
    from sqlalchemy.exc import OperationalError

    job_id = new_job()
    attempt = state.claim(job_id, settings).attempt

    def down(*args):
        raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))

    with ProgressReporter(job_id, attempt, heartbeat_interval_s=60) as progress:
        monkeypatch.setattr(state, "record_progress", down)
        progress("quantize", 1, 10)  # no exception: the job goes on
        monkeypatch.undo()
        progress("evaluate", 0, 4)
