import datetime as dt

import pytest

from app.models import JobStatus, utcnow
from worker import state


def ago(seconds: float) -> dt.datetime:
    return utcnow() - dt.timedelta(seconds=seconds)


def test_claim_runs_a_queued_job_once(new_job, load_job, settings):
    job_id = new_job()
    claim = state.claim(job_id, settings)
    assert claim.action is state.Action.RUN and claim.attempt == 1
    assert claim.request["model"] == "bundled:smollm2-135m"
    job = load_job(job_id)
    assert job.status == JobStatus.RUNNING and job.attempts == 1 and job.heartbeat_at is not None
    # The same message delivered again while the run is alive: wait, do not run twice.
    assert state.claim(job_id, settings).action is state.Action.WAIT


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_claim_skips_finished_and_unknown_jobs(new_job, settings, status):
    assert state.claim(new_job(status=status), settings).action is state.Action.SKIP
    assert state.claim("f" * 32, settings).action is state.Action.SKIP


def test_a_job_whose_worker_was_lost_runs_again(new_job, load_job, settings):
    job_id = new_job(status=JobStatus.RUNNING, attempts=1, heartbeat_at=ago(120))
    claim = state.claim(job_id, settings)
    assert claim.action is state.Action.RUN and claim.attempt == 2
    assert "attempt 2" in load_job(job_id).progress_message


def test_a_lost_job_out_of_attempts_fails_with_the_reason(new_job, load_job, settings):
    job_id = new_job(status=JobStatus.RUNNING, attempts=2, heartbeat_at=ago(120))
    assert state.claim(job_id, settings).action is state.Action.SKIP
    job = load_job(job_id)
    assert job.status == JobStatus.FAILED and job.finished_at is not None
    assert "stopped responding" in job.error and "gave up after 2 attempts" in job.error


def test_a_lost_job_with_a_cancel_request_ends_cancelled(new_job, load_job, settings):
    job_id = new_job(status=JobStatus.RUNNING, attempts=1, heartbeat_at=ago(120), cancel_requested=True)
    assert state.claim(job_id, settings).action is state.Action.SKIP
    assert load_job(job_id).status == JobStatus.CANCELLED


def test_writes_of_a_run_that_was_taken_over_are_refused(new_job, load_job, settings):
    job_id = new_job(status=JobStatus.RUNNING, attempts=1, heartbeat_at=ago(120))
    assert state.claim(job_id, settings).attempt == 2
    assert state.heartbeat(job_id, 1) is False
    with pytest.raises(state.LostClaim):
        state.record_progress(job_id, 1, "quantize", 1, 2, 50.0, "")
    with pytest.raises(state.LostClaim):
        state.succeed(job_id, 1, {}, "x.tar", "0" * 64, 1)
    assert load_job(job_id).status == JobStatus.RUNNING
    assert state.record_progress(job_id, 2, "quantize", 1, 2, 50.0, "layer 1") is False


def test_an_outcome_is_recorded_once_the_database_answers_again(new_job, load_job, settings, monkeypatch):
    from sqlalchemy.exc import OperationalError

    job_id = new_job()
    attempt = state.claim(job_id, settings).attempt
    real, calls = state.session_scope, []

    def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise OperationalError("UPDATE jobs", {}, Exception("could not connect to server"))
        return real()

    monkeypatch.setattr(state, "session_scope", flaky)
    monkeypatch.setattr(state.time, "sleep", lambda s: None)
    state.fail(job_id, attempt, "ValueError: no")
    assert len(calls) == 3
    assert load_job(job_id).status == JobStatus.FAILED and load_job(job_id).error == "ValueError: no"
