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
