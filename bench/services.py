"""Processes a benchmark starts and stops: PostgreSQL and Redis from their Debian binaries,
and `qforge serve` (API and worker) on a free port, each in a temporary folder.

PostgreSQL refuses to run as root: as root its commands run as the `postgres` user."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster on a free port; yields its SQLAlchemy URL."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not bins:
        raise RuntimeError("PostgreSQL not found: apt-get install -y postgresql")
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="qforge-bench-pg-"))  # not a private tmp folder: postgres must enter it
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()

    def run(*command) -> None:
        subprocess.run(_as_postgres([str(c) for c in command]), check=True, capture_output=True)

    run(bindir / "initdb", "-D", data, "-U", "qforge", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
    run(bindir / "pg_ctl", "-D", data, "-o", options, "-l", root / "postgres.log", "-w", "-t", "60", "start")
    try:
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "qforge", "qforge")
        yield f"postgresql+psycopg2://qforge@127.0.0.1:{port}/qforge"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def redis_server() -> Iterator[str]:
    """redis-server on a free port, persisting nothing; yields its URL."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get install -y redis-server")
    port, folder = free_port(), tempfile.mkdtemp(prefix="qforge-bench-redis-")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.2)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def qforge(*args: str, env: dict[str, str]) -> str:
    """Run a `qforge` command (e.g. `admin ...`) of this checkout; its stdout."""
    done = subprocess.run([sys.executable, "-m", "qforge.cli", *args], env=env, capture_output=True, text=True,
                          cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"qforge {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


@dataclass(frozen=True)
class RunningService:
    url: str
    pid: int  # the `qforge serve` process: its worker is a child (bench/chaos.py kills it)


@contextmanager
def qforge_service(data_dir: Path, env: dict[str, str], with_worker: bool = True) -> Iterator[RunningService]:
    """`qforge serve` on a free port, ready; yields its URL and process id. Its log is <data_dir>.log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = data_dir.with_suffix(".log")
    command = [sys.executable, "-m", "qforge.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command + ([] if with_worker else ["--no-worker"]), env=env, cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"qforge serve exited: {log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"qforge serve not ready: {log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield RunningService(url, process.pid)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def service_env(**settings: str) -> dict[str, str]:
    """This process's environment with the repo on PYTHONPATH and QFORGE_* settings replaced."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("QFORGE_") or k == "QFORGE_CACHE_DIR"}
    pythonpath = os.pathsep.join(p for p in (str(REPO), environ.get("PYTHONPATH")) if p)
    return {**environ, "PYTHONPATH": pythonpath, **{f"QFORGE_{k.upper()}": v for k, v in settings.items()}}
