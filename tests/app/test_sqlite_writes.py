"""The embedded database's connections queue their writes in the process (app/core/sqlite_writes.py):
judged against SQLite's own behaviour, which they must keep."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from app.core.sqlite_writes import QueuedWritesConnection, writes


@pytest.fixture
def connect(tmp_path):
    made = []

    def make(timeout: float = 5.0) -> sqlite3.Connection:
        connection = sqlite3.connect(tmp_path / "db.sqlite", timeout=timeout, factory=QueuedWritesConnection,
                                     check_same_thread=False)
        made.append(connection)
        return connection

    first = make()
    first.execute("PRAGMA journal_mode=WAL")
    first.execute("CREATE TABLE t (x INTEGER)")
    first.commit()
    yield make
    for connection in made:
        connection.close()


def test_statements_that_take_sqlite_s_write_lock_are_recognised():
    for statement in ("INSERT INTO t VALUES (1)", "  update t set x = 1", "DELETE FROM t", "REPLACE INTO t VALUES (1)",
                      "CREATE TABLE u (y)", "DROP TABLE u", "ALTER TABLE t ADD y", "BEGIN IMMEDIATE TRANSACTION"):
        assert writes(statement), statement
    for statement in ("SELECT * FROM t", "PRAGMA busy_timeout", "BEGIN", "SAVEPOINT sa_1", "select 'insert'"):
        assert not writes(statement), statement


def test_a_second_writer_waits_for_the_first_to_commit_then_writes(connect):
    first, second = connect(), connect()
    first.execute("INSERT INTO t VALUES (1)")
    done = threading.Event()

    def write() -> None:
        second.execute("INSERT INTO t VALUES (2)")
        second.commit()
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    assert not done.wait(0.3)  # the first still holds the file
    first.commit()
    assert done.wait(5)
    thread.join()
    assert sorted(x for (x,) in first.execute("SELECT x FROM t")) == [1, 2]


def test_readers_never_wait_for_a_writer(connect):
    writer, reader = connect(), connect()
    writer.execute("INSERT INTO t VALUES (1)")
    started = time.monotonic()
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (0,)  # WAL: the last committed state
    assert time.monotonic() - started < 1
    writer.rollback()


@pytest.mark.parametrize("end", ["commit", "rollback", "close"])
def test_every_end_of_a_transaction_lets_the_next_writer_in(connect, end):
    first, second = connect(), connect(timeout=2)
    first.execute("INSERT INTO t VALUES (1)")
    getattr(first, end)()
    second.execute("INSERT INTO t VALUES (2)")  # would wait 2 s, then raise, if the first still held it
    second.commit()


def test_a_statement_that_commits_by_itself_holds_nothing(tmp_path):
    """isolation_level=None: SQLite commits each statement; nothing is left held."""
    path = tmp_path / "auto.sqlite"
    first = sqlite3.connect(path, factory=QueuedWritesConnection, isolation_level=None, check_same_thread=False)
    second = sqlite3.connect(path, timeout=2, factory=QueuedWritesConnection, check_same_thread=False)
    first.execute("CREATE TABLE t (x INTEGER)")
    first.execute("INSERT INTO t VALUES (1)")
    second.execute("INSERT INTO t VALUES (2)")
    second.commit()
    assert second.execute("SELECT count(*) FROM t").fetchone() == (2,)
    first.close()
    second.close()


def test_a_writer_that_waits_past_its_timeout_gets_sqlite_s_own_error(connect):
    first, second = connect(), connect(timeout=0.3)
    first.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        second.execute("INSERT INTO t VALUES (2)")
    first.commit()


def test_many_threads_writing_at_once_all_succeed_and_lose_no_row(connect):
    errors: list[BaseException] = []

    def write(connection: sqlite3.Connection, base: int) -> None:
        try:
            for i in range(50):
                connection.execute("INSERT INTO t VALUES (?)", (base + i,))
                connection.commit()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(connect(), 1000 * n)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    rows = [x for (x,) in connect().execute("SELECT x FROM t")]
    assert sorted(rows) == sorted(1000 * n + i for n in range(8) for i in range(50))
