"""SQLite connections whose writers queue in the process instead of polling SQLite's lock.

SQLite lets one connection write at a time. A connection that finds the file locked sleeps
and retries (Python's busy handler sleeps 1, 2, 5, 10, ... up to 100 ms between tries) and is
not woken when the lock is freed. Under load the API's threads write at once, the holder of
the lock waits for the GIL between its statements, and the others sleep through the moments
the lock is free: at 50 clients the embedded service spent most of a submission's latency
asleep in that loop, with the CPU half idle.

These connections first take a lock of this process for their database file, as SQLite
would take its own, at the first statement that writes (INSERT, UPDATE, DELETE, REPLACE, a
schema change, BEGIN IMMEDIATE/EXCLUSIVE), and let it go when the transaction ends (commit,
rollback, close, or a statement that committed by itself). Waiting writers wake the moment it
is free. Another process (the worker, the API) still meets SQLite's own lock and busy timeout.
A writer that waits longer than the connection's timeout gets SQLite's own error, "database
is locked", as it would have from SQLite.

Nothing about what is written changes: a statement this takes for a read only waits more,
one it takes for a read that is in fact a write only waits on SQLite as before.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The leading keyword of a statement that takes SQLite's write lock.
_WRITES = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|BEGIN\s+(IMMEDIATE|EXCLUSIVE))\b", re.IGNORECASE)
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(database: str | os.PathLike) -> threading.Lock | None:
    """The process's lock for a database file; None for a private database (in memory, or
    SQLite's temporary one), which no other connection can write."""
    key = str(database)
    if key in ("", ":memory:") or "mode=memory" in key:
        return None
    if not key.startswith("file:"):
        key = os.path.realpath(key)
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def writes(statement: str) -> bool:
    return _WRITES.match(statement) is not None


class QueuedWritesCursor(sqlite3.Cursor):
    def execute(self, sql, parameters=(), /):
        with self.connection._queued(sql):
            return super().execute(sql, parameters)

    def executemany(self, sql, seq_of_parameters, /):
        with self.connection._queued(sql):
            return super().executemany(sql, seq_of_parameters)

    def executescript(self, sql_script, /):
        with self.connection._queued(sql_script):  # judged by its first statement
            return super().executescript(sql_script)


class QueuedWritesConnection(sqlite3.Connection):
    """Pass as `factory=` to sqlite3.connect (SQLAlchemy: `connect_args={"factory": ...}`)."""

    def __init__(self, database, *args, **kwargs) -> None:
        super().__init__(database, *args, **kwargs)
        self._write_lock = _lock_for(database)
        self._holding = False
        self._wait_s = float(kwargs.get("timeout", args[0] if args else 5.0))

    def cursor(self, factory=QueuedWritesCursor):
        return super().cursor(factory)

    # The connection's shortcuts run a cursor's C code directly, past the methods above.
    def execute(self, sql, parameters=(), /):
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql, seq_of_parameters, /):
        return self.cursor().executemany(sql, seq_of_parameters)

    def executescript(self, sql_script, /):
        return self.cursor().executescript(sql_script)

    @contextmanager
    def _queued(self, statement: str) -> Iterator[None]:
        """Around one statement: the file's lock taken first if it writes, let go after if
        its transaction is over."""
        if not self._holding and self._write_lock is not None and writes(statement):
            if not self._write_lock.acquire(timeout=self._wait_s):
                raise sqlite3.OperationalError("database is locked")
            self._holding = True
        try:
            yield
        finally:
            self._let_go_if_done()

    def _let_go(self) -> None:
        if self._holding:
            self._holding = False
            self._write_lock.release()

    def _let_go_if_done(self) -> None:
        """After a statement: a write that committed by itself (no transaction open now), or
        one that failed before it began one, holds nothing any more."""
        if self._holding and not self.in_transaction:
            self._let_go()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._let_go_if_done()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._let_go_if_done()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._let_go()
