"""Database engine, sessions and migrations.

The API and the worker are separate processes writing the same database. On SQLite that
means WAL (readers never block the writer) and a busy timeout (a writer waits for the other
instead of failing with "database is locked").
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import anyio
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

import app
from app.core.config import get_settings
from app.core.sqlite_writes import QueuedWritesConnection

T = TypeVar("T")
SQLITE_BUSY_TIMEOUT_S = 30
# app/ is a package at the repository root (also with an editable install), migrations/ beside it.
MIGRATIONS_DIR = Path(app.__file__).resolve().parent.parent / "migrations"

# Connections an engine keeps, and may open beyond that under load. The API runs sync routes
# and dependencies on anyio's 40 threads, and a request keeps its connection between them:
# with fewer connections than requests in flight, threads wait for one while holding the
# thread another request needs to finish (SQLAlchemy's default 5 + 10 made that most of a
# submission's latency at 50 clients). SQLite connections cost a file handle: plenty. A
# PostgreSQL server allows 100 by default, shared by the API and the workers (on PostgreSQL the
# API's requests draw from the async engine's pool; its sync pool serves the event streams).
POOL_SIZE = 20
SQLITE_POOL_OVERFLOW, POSTGRES_POOL_OVERFLOW = 100, 20
# One engine per URL per process: an engine owns a connection pool.
_engines: dict[str, tuple[Engine, sessionmaker[Session]]] = {}
# The API's request sessions on PostgreSQL: the same database through psycopg's asyncio side,
# per event loop (an async connection waits on the loop that opened it; tests run several).
_request_makers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, async_sessionmaker[AsyncSession]]]
_request_makers = weakref.WeakKeyDictionary()
_lock = threading.Lock()
# Where a request session's sync face keeps the AsyncSession it belongs to (Session.info).
_ASYNC_SESSION = "qforge.async_session"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable enough with WAL, and far fewer fsyncs
    cursor.close()


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        pool = {}  # an in-memory database has one connection per thread: no pool to size
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            pool = {"pool_size": POOL_SIZE, "max_overflow": SQLITE_POOL_OVERFLOW}
        engine = create_engine(
            url,
            # the process's writers queue for the file instead of sleeping on SQLite's lock
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False, "factory": QueuedWritesConnection},
            **pool,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre-ping: a pooled connection may have been closed by a database restart.
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POSTGRES_POOL_OVERFLOW)


def _entry(url: str) -> tuple[Engine, sessionmaker[Session]]:
    with _lock:
        if url not in _engines:
            engine = _create_engine(url)
            # expire_on_commit=False: routes and tasks read a job after committing it.
            _engines[url] = engine, sessionmaker(bind=engine, expire_on_commit=False)
        return _engines[url]


def engine_for(url: str) -> Engine:
    return _entry(url)[0]


def get_engine() -> Engine:
    return engine_for(get_settings().database_url)


def new_session() -> Session:
    return _entry(get_settings().database_url)[1]()


@lru_cache
def _is_postgres(url: str) -> bool:
    # asked on every request: the URL is parsed once, not each time
    return make_url(url).get_backend_name() == "postgresql"


def _request_sessionmaker(url: str) -> async_sessionmaker[AsyncSession] | None:
    """PostgreSQL only (the embedded SQLite runs its queries on the loop as they are; another
    backend keeps worker threads): an async engine on psycopg 3, whatever driver the URL names
    for the sync side (the worker and the CLI keep it)."""
    if not _is_postgres(url):
        return None
    with _lock:
        makers = _request_makers.setdefault(asyncio.get_running_loop(), {})
        if url not in makers:
            engine = create_async_engine(
                make_url(url).set(drivername="postgresql+psycopg"),
                pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POSTGRES_POOL_OVERFLOW,
            )
            makers[url] = async_sessionmaker(engine, expire_on_commit=False)
        return makers[url]


def _async_session_among(values: Iterable[Any]) -> AsyncSession | None:
    for value in values:
        if isinstance(value, Session) and _ASYNC_SESSION in value.info:
            return value.info[_ASYNC_SESSION]
    return None


async def run_db(function: Callable[..., T], /, *args: Any) -> T:
    """Database work called from async code, `function(*args)` with the request's session
    among the args: on the event loop itself, its waits on PostgreSQL awaited, or its SQLite
    queries run as they are; in a worker thread for any other database.

    A trip to a thread costs more than the queries: 0.7 to 1 ms of CPU each on this 2-core
    machine, and under load each trip waits for the GIL behind the other requests' threads (a
    poll made three). On PostgreSQL, the request's session is the sync face of an
    AsyncSession: SQLAlchemy runs `function` in a greenlet that suspends at each round trip,
    so a slow query or a restart stalls only its own request (at 50 clients, submissions'
    p99 fell by a quarter against threads, bench/RESULTS.md). A SQLite query is CPU work of
    this process under the GIL, not a wait: it runs as it is.
    What runs here must end its write transactions before returning (commit or roll back):
    a request holding the file's write lock across an await would block the loop's next
    writer, and with it the request that holds the lock (app/core/sqlite_writes.py)."""
    async_session = _async_session_among(args)
    if async_session is not None:
        return await async_session.run_sync(lambda _sync_face: function(*args))
    if not get_settings().storage_in_process:
        return await run_in_threadpool(function, *args)
    try:
        return function(*args)
    except BaseException:
        # Work that failed mid-write (a disk full, a lock timeout) ends its transaction here,
        # before the loop runs anything else, instead of at the session's close after the
        # error response is sent.
        for session in args:
            if isinstance(session, Session) and session.in_transaction():
                session.rollback()
        raise


def with_request_session(call: Callable[..., T]) -> Callable[..., Any]:
    """For a plain (sync) route or dependency that takes the request's session: FastAPI
    would run it in a worker thread, where an AsyncSession's sync face cannot reach the
    database; it runs as `run_db` runs database work instead (in a thread still for a
    database without an async engine here)."""

    @functools.wraps(call)
    async def run(**values: Any) -> T:
        async_session = _async_session_among(values.values())
        if async_session is not None:
            return await async_session.run_sync(lambda _sync_face: call(**values))
        return await run_in_threadpool(functools.partial(call, **values))

    return run


async def get_session() -> AsyncIterator[Session]:
    """A request's session (a FastAPI dependency: app.api.deps.SessionDep); on PostgreSQL,
    the sync face of an AsyncSession, for `run_db` and `with_request_session` to use.

    Async, so FastAPI makes and closes it in the request's own task: a sync generator
    dependency costs two trips to a worker thread, and under load each trip waits for the
    GIL behind the other requests' threads. Making a session does no I/O; closing one that
    still holds a connection (a read's transaction to roll back) is database work
    (`run_db`), shielded so that a client hanging up cannot leave the connection checked out."""
    request_sessions = _request_sessionmaker(get_settings().database_url)
    if request_sessions is not None:
        async_session = request_sessions()
        async_session.sync_session.info[_ASYNC_SESSION] = async_session
        try:
            yield async_session.sync_session
        finally:
            with anyio.CancelScope(shield=True):
                await async_session.close()
        return
    session = new_session()
    try:
        yield session
    finally:
        if session.in_transaction():
            with anyio.CancelScope(shield=True):
                await run_db(session.close)
        else:
            session.close()


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    session = new_session()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines(close: bool = True) -> None:
    """Drop every pooled connection. A forked worker child calls this with close=False: the
    parent's connections must be neither used nor closed by the child."""
    with _lock:
        for engine, _ in _engines.values():
            engine.dispose(close=close)
        _engines.clear()
        # an async engine's connections belong to the loop that opened them: dropped, not closed
        for makers in _request_makers.values():
            for request_sessions in makers.values():
                request_sessions.kw["bind"].sync_engine.dispose(close=False)
        _request_makers.clear()


def _alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not a main option: configparser would read '%' in a password.
    config.attributes["database_url"] = url
    return config


def migrate(url: str | None = None) -> None:
    """`alembic upgrade head` on the configured database (safe to run from several processes)."""
    from alembic import command

    command.upgrade(_alembic_config(url or get_settings().database_url), "head")


@lru_cache
def _migrations() -> tuple[frozenset[str], frozenset[str]]:
    """(this code's newest revisions, every revision it has), read once per process."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config(""))
    return frozenset(script.get_heads()), frozenset(r.revision for r in script.walk_revisions())


def schema_problem() -> str | None:
    """None when the database answers and is at this code's newest migration (readiness);
    otherwise what is wrong, and what to run. A database migrated by a newer qforge (a
    revision this code does not have) is not fixed by `qforge migrate` here."""
    with get_engine().connect() as connection:
        try:
            current = frozenset(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
        except DBAPIError:  # no alembic_version table
            current = frozenset()
    heads, known = _migrations()
    if current == heads:
        return None
    if not current:
        return "the database was never migrated; run `qforge migrate`"
    if unknown := sorted(current - known):
        return (f"the schema is at migration {', '.join(unknown)}, which this qforge does not have (newest: "
                f"{', '.join(sorted(heads))}): a newer qforge migrated the database; run that version")
    return (f"the schema is at migration {', '.join(sorted(current))}, older than this qforge's newest "
            f"({', '.join(sorted(heads))}); run `qforge migrate`")
