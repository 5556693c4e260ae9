"""A job's stored log: lines in order, read on from a seq, the oldest trimmed past the
limit, a line that cannot be written given up without undoing the caller's change."""

from sqlalchemy import update

from app import joblog
from app.core.db import session_scope
from app.models import Job, JobStatus, LogLevel


def lines(job_id: str, after: int = 0, limit: int | None = None) -> list[tuple[int, str]]:
    with session_scope() as session:
        return [(row.id, row.message) for row in joblog.read(session, job_id, after, limit)]


def write(job_id: str, *messages: str, max_lines: int | None = None) -> None:
    with session_scope() as session:
        for message in messages:
            assert joblog.append(session, job_id, message, max_lines=max_lines)


def test_lines_are_read_in_order_from_after_a_seq(submit):
    job_id, other = submit().json()["id"], submit().json()["id"]
    write(job_id, "a", "b")
    write(other, "elsewhere")
    write(job_id, "c")
    read = lines(job_id)
    assert [m for _, m in read] == ["a", "b", "c"]
    assert [s for s, _ in read] == sorted(s for s, _ in read)
    assert lines(job_id, after=read[0][0]) == read[1:]
    assert lines(job_id, after=read[0][0], limit=1) == read[1:2]
    assert lines(job_id, after=read[-1][0]) == []
    assert [m for _, m in lines(other)] == ["elsewhere"]


def test_past_the_limit_the_oldest_lines_are_removed(submit):
    job_id, other = submit().json()["id"], submit().json()["id"]
    write(other, "kept")
    write(job_id, *[f"line {i}" for i in range(25)], max_lines=10)
    assert [m for _, m in lines(job_id)] == [f"line {i}" for i in range(15, 25)]
    assert [m for _, m in lines(other)] == ["kept"]  # another job's lines are not counted


def test_the_setting_bounds_the_lines_kept(submit, monkeypatch):
    from app.core.config import get_settings

    monkeypatch.setenv("QFORGE_JOB_LOG_MAX_LINES", "12")
    get_settings.cache_clear()
    job_id = submit().json()["id"]
    write(job_id, *[str(i) for i in range(30)])
    assert [m for _, m in lines(job_id)] == [str(i) for i in range(18, 30)]


def test_a_line_that_cannot_be_written_leaves_the_callers_change(submit):
    job_id = submit().json()["id"]
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.CANCELLED))
        # an unknown level breaks the table's CHECK constraint: the insert fails
        assert joblog.append(session, job_id, "broken", level="verbose") is False
        assert joblog.append(session, job_id, "after it", LogLevel.WARNING) is True
    with session_scope() as session:
        assert session.get(Job, job_id).status == JobStatus.CANCELLED
    assert [m for _, m in lines(job_id)] == ["after it"]
