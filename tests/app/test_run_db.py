"""Where a request's database work runs (app.core.db.run_db): on the event loop for the
embedded default, whose SQLite work is CPU in this process, and in a worker thread when the
database or the broker is a network service, so a slow round trip never stalls the loop."""

from __future__ import annotations

import threading

import anyio
import pytest

from app.core.config import get_settings
from app.core.db import run_db


def runs_on_the_loop() -> bool:
    async def main() -> tuple[int, int]:
        return threading.get_ident(), await run_db(threading.get_ident)

    loop_thread, call_thread = anyio.run(main)
    return call_thread == loop_thread


def test_the_embedded_default_runs_database_work_on_the_loop(settings):
    assert settings.storage_in_process
    assert runs_on_the_loop()


@pytest.mark.parametrize("setting, url", [
    ("QFORGE_DATABASE_URL", "postgresql+psycopg://qforge@127.0.0.1:1/qforge"),
    ("QFORGE_BROKER_URL", "redis://127.0.0.1:1/0"),
])
def test_a_network_database_or_broker_sends_it_to_a_thread(settings, monkeypatch, setting, url):
    monkeypatch.setenv(setting, url)
    get_settings.cache_clear()
    assert not get_settings().storage_in_process
    assert not runs_on_the_loop()


def test_work_that_fails_mid_write_ends_its_transaction_before_the_error_leaves(settings):
    """On the loop, a write transaction left open would hold the database file's lock for
    this process until the session closes, after the error response is sent; meanwhile the
    loop's next writer would wait for it, and with it every request."""
    from sqlalchemy import select

    from app.core.db import new_session
    from app.models import Tenant

    def write_then_fail(session) -> None:
        session.add(Tenant(id="half-written"))
        session.flush()  # the INSERT has run: this connection holds the write lock
        raise OSError("disk full")

    session = new_session()

    async def main() -> None:
        await run_db(write_then_fail, session)

    with pytest.raises(OSError):
        anyio.run(main)
    assert not session.in_transaction()
    with new_session() as other:
        other.add(Tenant(id="next-writer"))
        other.commit()  # would wait out the 30 s busy timeout if the lock were still held
        assert other.scalars(select(Tenant.id).where(Tenant.id.in_(["half-written", "next-writer"]))).all() == ["next-writer"]
