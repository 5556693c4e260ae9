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
        version = db.execute("SELECT version_num FROM alembic_version").fetchall()
    # the newest migration file's revision (not a number written here, which each new migration would break)
    from alembic.script import ScriptDirectory

    from app.core.db import _alembic_config

    assert version == [(ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head(),)]
    assert version[0][0] >= "0006"


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


def test_serve_writes_json_lines_when_asked(tmp_path, closed_port):
    """uvicorn's own lines and the request lines alike, so a log pipeline reads them all."""
    import json
    import signal
    import time

    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("QFORGE_") or k == "QFORGE_CACHE_DIR"}
    env["QFORGE_LOG_FORMAT"] = "json"
    command = [sys.executable, "-m", "qforge.cli", "serve", "--no-worker", "--port", str(closed_port), "--data-dir", str(tmp_path)]
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{closed_port}/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "serve did not start"
                time.sleep(0.3)
        key = (tmp_path / "api.key").read_text().strip()  # the embedded default's first key
        response = httpx.get(f"http://127.0.0.1:{closed_port}/v1/jobs/{'a' * 32}", timeout=5,
                             headers={"Authorization": f"Bearer {key}"})
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]  # every line is one JSON object
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    [access] = [line for line in lines if line["logger"] == "qforge.access"]  # and uvicorn's access log is off
    assert (access["route"], access["status"], access["job_id"]) == ("/v1/jobs/{job_id}", 404, "a" * 32)
    assert access["request_id"] == response.headers["x-request-id"] and access["tenant_id"] == "default"
    assert any(key in line["message"] for line in lines if line["level"] == "warning")  # the new key, said once
