import os
import sqlite3
import subprocess
import sys

from app.core.config import get_settings
from qforge.cli import build_parser, main, worker_command


def test_migrate_creates_the_schema_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QFORGE_DATA_DIR", "unused")  # restored after the test; main() overrides it
    monkeypatch.delenv("QFORGE_DATABASE_URL", raising=False)
    try:
        assert main(["migrate", "--data-dir", str(tmp_path)]) == 0
    finally:
        get_settings.cache_clear()
    with sqlite3.connect(tmp_path / "qforge.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0007",)]


def test_the_worker_is_a_real_prefork_celery_worker():
    command = worker_command(3)
    assert command[1:5] == ["-m", "celery", "-A", "worker.celery_app"]
    assert "--pool=prefork" in command and "--concurrency=3" in command
    args = build_parser().parse_args(["serve", "--port", "9001", "--no-worker"])
    assert args.port == 9001 and args.no_worker


def test_serve_exits_non_zero_when_the_worker_cannot_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QFORGE_") or k == "QFORGE_CACHE_DIR"}
    env["QFORGE_BROKER_URL"] = "no-such-transport://localhost"
    result = subprocess.run(
        [sys.executable, "-m", "qforge.cli", "serve", "--port", "1", "--data-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode != 0
    assert "the worker exited" in result.stderr
