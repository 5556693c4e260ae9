"""Artifact downloads through the API: the API process's extra memory while it streams one.

A real API process (`qforge serve --no-worker` on a private data folder) serves a succeeded
job whose artifact is a file of random bytes; this script downloads it over HTTP (whole, and
as two Range requests), checks the sha256, and reads the server's resident memory: before
(after a warm-up request) and its peak during the downloads (the kernel's high-water mark,
reset first; Linux). The export issue's target: < 50 MB extra for a 100 MB artifact.

With `--stores folder,s3` it does so for each artifact store: the local folder, and an S3
bucket on a local S3 server (moto's, its own process, so its memory is not the API's),
which the API streams from over HTTP.

    python bench/download_rss.py [--mb 100] [--stores folder,s3] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SEED = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def _succeeded_job(data_dir: Path, size: int, store_env: dict[str, str]) -> tuple[str, str]:
    """Insert a succeeded job whose artifact is `size` random bytes, put in the configured
    store; returns its id and sha256."""
    import numpy as np
    from sqlalchemy import update

    from app.artifact_store import store_for
    from app.core.config import get_settings
    from app.core.db import migrate, session_scope
    from app.models import DEFAULT_TENANT, Job, JobStatus

    os.environ.update(QFORGE_DATA_DIR=str(data_dir), **store_env)
    get_settings.cache_clear()
    settings = get_settings()
    migrate()
    store = store_for(settings)
    store.prepare()
    path = data_dir / f"artifact-{uuid.uuid4().hex}.partial"
    digest = hashlib.sha256()
    rng = np.random.default_rng(SEED)
    with open(path, "wb") as fh:
        for start in range(0, size, 1 << 20):  # written in pieces: this process stays small too
            chunk = rng.integers(0, 256, min(1 << 20, size - start), dtype=np.uint8).tobytes()
            digest.update(chunk)
            fh.write(chunk)
    from app import crud
    from quantcore.job import JobRequest

    with session_scope() as session:
        request = JobRequest(model="bundled:smollm2-135m", recipe="w4a16-rtn-g64")
        job, _ = crud.create_job(session, request, None, tenant_id=DEFAULT_TENANT)
        job_id = job.id
        store.put(f"{job_id}.tar", path)
        session.execute(update(Job).where(Job.id == job_id).values(
            status=JobStatus.SUCCEEDED, artifact_path=f"{job_id}.tar", artifact_sha256=digest.hexdigest(), artifact_bytes=size))
    return job_id, digest.hexdigest()


def _wait_http(url: str, process: subprocess.Popen) -> None:
    import httpx

    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode}")
        try:
            httpx.get(url, timeout=5)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


def _s3_server(port: int) -> subprocess.Popen:
    """moto's S3 server in its own process; credentials it accepts, set for this process and the API."""
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_http(f"http://127.0.0.1:{port}/", server)
    return server


def measure(store: str, size: int) -> tuple[float, list[tuple[str, float, int]]]:
    """The API's RSS before, and per download (label, seconds, peak RSS)."""
    import httpx

    helpers: list[subprocess.Popen] = []
    store_env: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if store == "s3":
                s3_port = _free_port()
                helpers.append(_s3_server(s3_port))
                store_env = {"QFORGE_ARTIFACT_URL": "s3://qforge-bench/artifacts",
                             "QFORGE_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "QFORGE_S3_REGION": "us-east-1"}
            data_dir = Path(tmp) / "data"
            job_id, sha = _succeeded_job(data_dir, size, store_env)
            port = _free_port()
            env = {**os.environ, "QFORGE_DATA_DIR": str(data_dir), **store_env}
            server = subprocess.Popen([sys.executable, "-m", "qforge.cli", "serve", "--no-worker", "--port", str(port)], env=env)
            helpers.append(server)
            base = f"http://127.0.0.1:{port}"
            _wait_http(f"{base}/healthz", server)
            with httpx.Client(base_url=base, timeout=60) as client:
                # warm-up: routes, database, serializers, the store's client
                client.get(f"/v1/jobs/{job_id}")
                client.get(f"/v1/jobs/{job_id}/artifact", headers={"Range": "bytes=0-0"}).raise_for_status()
                before = _status_bytes(server.pid, "VmRSS")
                Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # peak := now
                rows = []
                for label, ranges in (("whole", [None]), ("two Range halves", [(0, size // 2 - 1), (size // 2, size - 1)])):
                    digest, received, start = hashlib.sha256(), 0, time.perf_counter()
                    for span in ranges:
                        headers = {"Range": f"bytes={span[0]}-{span[1]}"} if span else {}
                        with client.stream("GET", f"/v1/jobs/{job_id}/artifact", headers=headers) as response:
                            response.raise_for_status()
                            for chunk in response.iter_bytes(1 << 16):
                                digest.update(chunk)
                                received += len(chunk)
                    seconds = time.perf_counter() - start
                    if received != size or digest.hexdigest() != sha:
                        raise SystemExit(f"{label}: received {received} bytes, sha256 mismatch: {digest.hexdigest() != sha}")
                    rows.append((label, seconds, _status_bytes(server.pid, "VmHWM")))
        finally:
            for helper in reversed(helpers):
                helper.terminate()
                helper.wait(30)
            for name in store_env:
                os.environ.pop(name, None)
    return before, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="artifact size in MB (10^6 bytes)")
    parser.add_argument("--stores", default="folder,s3", help="artifact stores to serve from: folder, s3")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--section", default="Export: artifact download memory of the API")
    args = parser.parse_args()
    from common import run_header, write_section

    stores = [name.strip() for name in args.stores.split(",") if name.strip()]
    header = run_header(SEED, artifact_mb=args.mb, stores=",".join(stores))
    print("\n".join(header), flush=True)
    lines = [
        "| store | download | MB | seconds | MB/s | API RSS before MB | API peak RSS MB | extra over before MB | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for store in stores:
        before, rows = measure(store, args.mb * 10**6)
        for label, seconds, peak in rows:
            lines.append(f"| {store} | {label} | {args.mb} | {seconds:.2f} | {args.mb / seconds:.0f} | {before / 1e6:.1f} | "
                         f"{peak / 1e6:.1f} | {(peak - before) / 1e6:.1f} | < 50 MB extra |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.results:
        write_section(args.results, args.section, header, table, " ".join(["python"] + sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
