"""Shared fixtures. Tests run with a private cache and data folder so they never touch a
user's ~/.cache/qforge, and with 2 torch threads (the machine's cores)."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU the Triton kernels run through Triton's interpreter. It must be switched on
# before anything imports triton.language (whose own jit functions, tl.zeros and the like,
# are defined at that import): some test modules collected before tests/quantcore/kernels
# import it through their dependencies, so it is set here, first, for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One torch thread for the test: on small tensors, thread hand-offs on a shared machine
    cost more than the arithmetic they split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _private_qforge_cache(tmp_path_factory):
    if "QFORGE_TEST_KEEP_CACHE" not in os.environ:
        os.environ.setdefault("QFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("qforge-cache")))
    yield


SERVICE_ENV = (
    "QFORGE_DATABASE_URL",
    "QFORGE_BROKER_URL",
    "QFORGE_ARTIFACT_DIR",
    "QFORGE_ALLOW_LOCAL_MODEL_PATHS",
    "QFORGE_BOOTSTRAP_API_KEY",
    "QFORGE_MAX_UPLOAD_BYTES",
    "QFORGE_MAX_DATASET_SAMPLES",
    "QFORGE_ARTIFACT_URL",
    "QFORGE_S3_ENDPOINT_URL",
    "QFORGE_S3_REGION",
    "QFORGE_S3_PUBLIC_ENDPOINT_URL",
    "QFORGE_ARTIFACT_LINKS",
    "QFORGE_ARTIFACT_LINK_MAX_SECONDS",
    "QFORGE_ARTIFACT_RETENTION_DAYS",
    "QFORGE_SIGNING_KEY",
    "QFORGE_PUBLIC_URL",
    "QFORGE_WEBHOOK_SECRET",
    "QFORGE_WEBHOOK_ALLOW_LOOPBACK",
    "QFORGE_WEBHOOK_ALLOWED_NETWORKS",
    "QFORGE_WEBHOOK_TIMEOUT_S",
    "QFORGE_WEBHOOK_MAX_ATTEMPTS",
    "QFORGE_WEBHOOK_BACKOFF_S",
    "QFORGE_WEBHOOK_POLL_INTERVAL_S",
    "QFORGE_LOG_FORMAT",
)


@pytest.fixture
def service_env() -> dict[str, str]:
    """Extra QFORGE_* settings for the `settings` fixture; a test folder may override it."""
    return {}


@pytest.fixture
def settings(tmp_path, monkeypatch, service_env):
    """Service settings on a private data folder (SQLite database and broker), migrated."""
    from app.core.config import get_settings
    from app.core.db import dispose_engines, migrate

    monkeypatch.setenv("QFORGE_DATA_DIR", str(tmp_path / "data"))
    for name in SERVICE_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in service_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    migrate()
    yield get_settings()
    dispose_engines()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API over HTTP on a local port (moto's server), for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """QFORGE_* settings for an artifact store in a fresh bucket of the local S3 server."""
    import uuid

    import boto3

    # credentials the local server accepts; never a real account's
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "qforge-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "qforge-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    bucket = f"qforge-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"QFORGE_ARTIFACT_URL": f"s3://{bucket}/artifacts", "QFORGE_S3_ENDPOINT_URL": s3_server, "QFORGE_S3_REGION": "us-east-1"}


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on (bound and released: connecting is refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def json_log():
    """The root logger's records at INFO and above, as app.logctx's JSON lines: call it for
    the lines written so far, each parsed back (a line that is not one JSON object fails)."""
    import io
    import json
    import logging

    from app.logctx import JsonFormatter

    stream, root = io.StringIO(), logging.getLogger()
    handler, level = logging.StreamHandler(stream), root.level
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 taking webhook POSTs, in a thread. The n-th delivery of
    each event id (X-Qforge-Event-Id) is answered with `statuses[n]` (the last one repeats);
    every request is kept in `requests`, with the status it got."""

    def __init__(self, statuses: list[int], delay_s: float = 0.0, headers: dict[str, str] | None = None) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.statuses, self.delay_s, self.extra_headers = statuses, delay_s, headers or {}
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                import time

                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    event_id = self.headers.get("X-Qforge-Event-Id")
                    seen = sum(1 for r in receiver.requests if r["headers"].get("x-qforge-event-id") == event_id)
                    status = receiver.statuses[min(seen, len(receiver.statuses) - 1)]
                    receiver.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                              "body": body, "status": status, "at": time.time()})
                time.sleep(receiver.delay_s)
                try:
                    self.send_response(status)
                    for name, value in receiver.extra_headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok" if status < 300 else b"no")
                except (BrokenPipeError, ConnectionResetError):  # the sender timed out first
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/qforge?tenant=t1"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="webhook-receiver", daemon=True)
        self._thread.start()

    def received(self, event_id: str | None = None) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if event_id is None or r["headers"].get("x-qforge-event-id") == event_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_receiver():
    """webhook_receiver([500, 200]) -> a running WebhookReceiver; all are stopped at the end."""
    started: list[WebhookReceiver] = []

    def start(statuses: list[int] = [200], **kwargs) -> WebhookReceiver:  # noqa: B006 (never mutated)
        started.append(WebhookReceiver(statuses, **kwargs))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()
