"""End-to-end fixtures: `qforge serve` as a real process (API + Celery worker) on a free
port, optionally against a PostgreSQL and a Redis that these fixtures start in temporary
folders and stop at the end of the session."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

SERVICE_ENV = (
    "QFORGE_DATABASE_URL", "QFORGE_BROKER_URL", "QFORGE_ARTIFACT_DIR", "QFORGE_ARTIFACT_URL", "QFORGE_S3_ENDPOINT_URL",
    "QFORGE_HOST", "QFORGE_PORT",
)
# The admin key of the default tenant that every service these fixtures start makes sure
# exists (QFORGE_BOOTSTRAP_API_KEY), and that the clients they return send.
TEST_API_KEY = "qf_e2e-test-key-0123456789abcdefghijklmnopqrstuvwxyz"
INSTALL_HINT = "install them with `apt-get install -y postgresql redis-server` (scripts/test.sh does this as root)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _qforge_command() -> list[str]:
    script = Path(sys.executable).with_name("qforge")  # the console script beside this interpreter
    return [str(script)] if script.exists() else [sys.executable, "-m", "qforge.cli"]


class Service:
    """One `qforge serve` process; its log goes to a file, shown when it fails to start."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = env.get("QFORGE_BOOTSTRAP_API_KEY", TEST_API_KEY)
        self.log_path = data_dir.parent / f"serve-{self.port}.log"
        self.data_dir = data_dir
        environ = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
        self._command = [*_qforge_command(), "serve", "--port", str(self.port), "--data-dir", str(data_dir)]
        self._env = {**environ, "QFORGE_BOOTSTRAP_API_KEY": TEST_API_KEY, **env}
        self._launch()

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self._command, env=self._env, stdout=log, stderr=subprocess.STDOUT)

    def restart(self) -> None:
        """Stop the process (SIGTERM) and start it again on the same port and data folder."""
        self.stop()
        assert self.process.returncode == 0, f"qforge serve exited with {self.process.returncode}:\n{self.log_tail()}"
        self._launch()
        self.wait_ready()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"qforge serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"qforge serve was not ready within {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def start_service(tmp_path_factory):
    """Start `qforge serve` with extra environment; every service is stopped at module end."""
    started: list[Service] = []

    def start(env: dict[str, str] | None = None) -> httpx.Client:
        service = Service(tmp_path_factory.mktemp("qforge") / "data", env or {})
        started.append(service)
        service.wait_ready()
        client = httpx.Client(base_url=service.url, timeout=30, headers={"Authorization": f"Bearer {service.api_key}"})
        client.service = service  # for tests that kill, stop or restart the process behind it
        return client

    yield start
    for service in started:
        service.stop()
        code = service.process.returncode
        assert code == 0, f"qforge serve exited with {code}:\n{service.log_tail()}"


# --------------------------------------------------------------------------------------
# PostgreSQL and Redis, started from their binaries
# --------------------------------------------------------------------------------------
def _missing(what: str) -> None:
    message = f"{what} not found: {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(message)
    print(f"skipping: {message}")
    pytest.skip(message)


def _as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; as another user it runs as that user.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


# url -> (stop, start) of the PostgreSQL or Redis server these fixtures started there
SERVERS: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}


@pytest.fixture
def outage():
    """`with outage(url):` that server is down inside the block and started again (same
    data, same port) when the block ends."""

    @contextlib.contextmanager
    def down(url: str):
        stop, start = SERVERS[url]
        stop()
        try:
            yield
        finally:
            start()

    return down


@pytest.fixture(scope="session")
def postgres_url():
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not bins:
        _missing("PostgreSQL (initdb, pg_ctl)")
    bindir = Path(bins[-1]).parent
    # Not under pytest's tmp folder: that one is private to root, and postgres must enter it.
    root = Path(tempfile.mkdtemp(prefix="qforge-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()

    def run(*command) -> None:
        subprocess.run(_as_postgres([str(c) for c in command]), check=True, capture_output=True)

    run(bindir / "initdb", "-D", data, "-U", "qforge", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = (bindir / "pg_ctl", "-D", data, "-o", options, "-l", root / "postgres.log", "-w", "-t", "60", "start")
    run(*start)
    try:
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "qforge", "qforge")
        url = f"postgresql+psycopg2://qforge@127.0.0.1:{port}/qforge"
        SERVERS[url] = (lambda: run(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"), lambda: run(*start))
        yield url
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def new_database(postgres_url):
    """`new_database()`: the URL of an empty database of its own on the session's PostgreSQL
    (other modules' services share that server)."""
    import uuid

    from sqlalchemy import create_engine, text

    def create() -> str:
        name = f"test_{uuid.uuid4().hex[:12]}"
        engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
        engine.dispose()
        return f"{postgres_url.rsplit('/', 1)[0]}/{name}"

    return create


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    server = shutil.which("redis-server")
    if server is None:
        _missing("redis-server")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    processes: list[subprocess.Popen] = []

    def start() -> None:  # no persistence: a restart loses every message, the harshest case
        command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)]
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or processes[-1].poll() is not None:
                    pytest.fail("redis-server did not start")
                time.sleep(0.2)

    def stop() -> None:
        processes[-1].terminate()
        processes[-1].wait(timeout=30)

    try:
        start()
        url = f"redis://127.0.0.1:{port}/0"
        SERVERS[url] = (stop, start)
        yield url
    finally:
        processes[-1].terminate()
        processes[-1].wait(timeout=30)


# --------------------------------------------------------------------------------------
# following a job over HTTP
# --------------------------------------------------------------------------------------
MAIN_JOB = {"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64", "evaluation": {"perplexity_tokens": 2048}}
JOB_TIMEOUT_S = 600


def _wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout_s: float = JOB_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {job['status']} after {timeout_s} s: {job['progress']}")
        time.sleep(0.3)


@pytest.fixture
def wait_for():
    """wait_for(client, job_id, statuses) -> the job, once its status is one of them."""
    return _wait_for


def follow_events(client: httpx.Client, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> list[tuple[str, dict]]:
    """Every server-sent event of a job until its stream ends, as (event, job) pairs."""
    import json

    events, fields = [], {}
    deadline = time.monotonic() + timeout_s
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(30, read=60)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id}: event stream still open after {timeout_s} s")
            if not line:  # a blank line ends an event
                if "data" in fields:
                    events.append((fields.get("event", "message"), json.loads(fields["data"])))
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
    return events


@pytest.fixture
def main_job(tmp_path):
    """Submit the main SmolLM2 job, follow it to success, and check everything a client gets:
    progress through the stages, the report, the artifact (checksum, ranges) and, loaded
    back with quantcore, the same perplexity as the report."""

    def run(client: httpx.Client, body: dict = MAIN_JOB) -> dict:
        import hashlib
        import tarfile

        from quantcore.eval import evaluate_perplexity
        from quantcore.export import load_quantized
        from quantcore.job import STAGES, EvaluationSpec

        submitted = client.post("/v1/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]

        streamed = follow_events(client, job_id)
        logs = [line for kind, line in streamed if kind == "log"]
        events = [(kind, job) for kind, job in streamed if kind != "log"]  # the job's own states
        # the stored log, as the stream carried it: in order, a line per stage, ending in success
        assert [line["seq"] for line in logs] == sorted(line["seq"] for line in logs)
        assert {"quantize", "export"} <= {line["stage"] for line in logs}, logs
        assert logs[-1]["level"] == "info" and "succeeded" in logs[-1]["message"], logs[-1]
        assert client.get(f"/v1/jobs/{job_id}/logs").json()["items"] == logs  # and the endpoint agrees
        assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded", events[-1]
        assert {"running", "succeeded"} <= {job["status"] for kind, job in events if kind == "status"}
        stages = [job["progress"]["stage"] for _, job in events if job["progress"]["stage"]]
        order = [STAGES.index(s) for s in stages]
        assert order == sorted(order), f"stages out of order: {stages}"
        assert {"load", "quantize", "evaluate", "export"} <= set(stages), stages
        percents = [job["progress"]["percent"] for _, job in events]
        assert percents == sorted(percents) and percents[-1] == 100.0

        job = _wait_for(client, job_id, {"succeeded"})
        report = client.get(f"/v1/jobs/{job_id}/report").raise_for_status().json()
        quantized = report["metrics"]["quantized"]["perplexity"]
        baseline = report["metrics"]["baseline"]["perplexity"]
        assert 5 < baseline < quantized < 2 * baseline, report["metrics"]

        archive, digest = tmp_path / "artifact.tar", hashlib.sha256()
        with client.stream("GET", f"/v1/jobs/{job_id}/artifact") as response:
            assert response.status_code == 200
            assert f"qforge-{job_id}.tar" in response.headers["content-disposition"]
            checksum = response.headers["x-checksum-sha256"]
            with open(archive, "wb") as out:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    out.write(chunk)
        assert digest.hexdigest() == checksum == job["artifact"]["sha256"]
        data = archive.read_bytes()
        assert len(data) == job["artifact"]["bytes"]
        part = client.get(f"/v1/jobs/{job_id}/artifact", headers={"Range": "bytes=1000-4999"})
        assert part.status_code == 206 and part.content == data[1000:5000]

        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path / "unpacked", filter="data")
        loaded = load_quantized(tmp_path / "unpacked")
        remeasured = evaluate_perplexity(loaded.model, loaded.tokenizer, EvaluationSpec(perplexity_tokens=2048))
        assert abs(remeasured / quantized - 1) < 1e-3, (remeasured, quantized)
        return job

    return run
