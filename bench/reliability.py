"""Reliability and security acceptance: prints the counts the issue asks for.

    python bench/reliability.py [--results bench/RESULTS.md]

- isolation probes / leaks: tenant B asks for each of tenant A's objects through every route
  of the OpenAPI schema and the dashboard (bench/isolation.py), in-process, on the embedded
  default (SQLite) and on PostgreSQL + Redis started here;
- fuzz cases / 5xx: schemathesis cases for every operation (bench/fuzz.py), in-process, on
  both backends;
- hostile uploads / accepted: the hostile-upload corpus (bench/hostile_corpus.py), in-process;
- jobs killed / lost: a live embedded service whose worker is SIGKILLed mid-job across the
  stages, then restarted (bench/chaos.py);
- submit latency p50/p99 at 50 clients for 60 s (bench/load.py), on the embedded default and
  on PostgreSQL + Redis, both live `qforge serve` processes on loopback.
Prints the machine, versions and seed first; `--results` rewrites this benchmark's section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import fuzz, isolation, load  # noqa: E402
from bench.services import postgres, qforge, qforge_service, redis_server, service_env  # noqa: E402

SEED = 0
LATENCY_BUDGET_MS = 100.0


def machine_header() -> list[str]:
    import platform
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    versions = ", ".join(f"{p} {version(p)}" for p in ("qforge", "fastapi", "sqlalchemy", "psycopg", "celery", "schemathesis"))
    return [f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}", f"versions: {versions}",
            f"seed: {SEED}", f"date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"]


@contextmanager
def in_process(folder: Path, **settings: str):
    """The ASGI app on a fresh data folder, migrated (what the tests' fixtures do); `settings`
    are QFORGE_* values for its duration (database_url and broker_url: Postgres and Redis)."""
    from app.core.config import get_settings
    from app.core.db import dispose_engines, migrate

    values = {"QFORGE_DATA_DIR": str(folder), **{f"QFORGE_{k.upper()}": v for k, v in settings.items()}}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        migrate()
        from app.main import app

        yield app, get_settings()
    finally:
        dispose_engines()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


def make_key(tenant: str, unlimited: bool = True) -> str:
    from app import tenants
    from app.core.db import session_scope
    from app.models import Scope, Tenant

    with session_scope() as session:
        if session.get(Tenant, tenant) is None:
            tenants.create_tenant(session, tenant)
        if unlimited:
            row = session.get(Tenant, tenant)
            row.requests_per_minute, row.max_active_jobs = 0, 1_000_000
        session.commit()
        return tenants.create_key(session, tenant, Scope.ADMIN, "reliability bench").secret


def run_isolation(folder: Path, **settings: str) -> dict:
    import hashlib
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from safetensors.torch import save_model

    from app.artifact_store import store_for
    from app.core.db import session_scope
    from app.dashboard.auth import API_KEY_COOKIE
    from app.models import Job, JobStatus, utcnow
    from quantcore.models.digits_cnn import DigitsCNN

    with in_process(folder / "isolation", **settings) as (app, config):
        clients = {}
        for tenant in ("tenant-a", "tenant-b"):
            key = make_key(tenant)
            clients[tenant] = TestClient(app, headers={"Authorization": f"Bearer {key}"})
            clients[tenant].cookies.set(API_KEY_COOKIE, key)
        a = clients["tenant-a"]
        replay_key = isolation.new_idempotency_key()
        job_id = a.post("/v1/jobs", json=load.JOB, headers={"Idempotency-Key": replay_key}).json()["id"]
        payload = os.urandom(4096)
        staged = folder / f"{job_id}.tar"
        staged.write_bytes(payload)
        store_for(config).put(staged.name, staged)
        digest = hashlib.sha256(payload).hexdigest()
        with session_scope() as session:  # finished as a worker would finish it, with its artifact stored
            job = session.get(Job, job_id)
            job.status, job.finished_at, job.artifact_path = JobStatus.SUCCEEDED, utcnow(), staged.name
            job.artifact_sha256, job.artifact_bytes = digest, len(payload)
            job.report = {"artifacts": [{"format": "qforge", "file": staged.name, "sha256": digest, "bytes": len(payload)}]}
        buffer = io.BytesIO()
        np.savez(buffer, x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))
        dataset = a.post("/v1/datasets", files={"file": ("a.npz", buffer.getvalue(), "application/octet-stream")}).json()
        weights = folder / "model.safetensors"
        save_model(DigitsCNN(), str(weights))
        model = a.post("/v1/models", files={"file": ("model.safetensors", weights.read_bytes(), "application/octet-stream")},
                       data={"config": json.dumps({"architecture": "digits-cnn"})}).json()
        key = a.post("/v1/keys", json={"scope": "read"}).json()
        ids = {"job": job_id, "dataset": dataset["id"], "model": model["id"], "key": key["id"], "idempotency_key": replay_key}
        b = clients["tenant-b"]
        result = isolation.probe(a, b, ids, dashboard_b=b)
    return {"isolation_probes": result.probes, "isolation_leaks": len(result.leaks), "leaks": result.leaks}


def run_fuzz(folder: Path, cases: int, **settings: str) -> dict:
    with in_process(folder / "fuzz", **settings) as (app, _):
        result = fuzz.fuzz_app(app, make_key("fuzz"), cases_per_operation=cases, seed=SEED)
    return {"fuzz_cases": result.cases, "fuzz_5xx": len(result.server_errors),
            "fuzz_errors_not_problem_json": len(result.not_problems),
            "examples": (result.server_errors + result.not_problems)[:5]}


def run_hostile(folder: Path) -> dict:
    from fastapi.testclient import TestClient

    from bench import hostile_corpus

    # the smallest upload limit the corpus allows: its oversized cases stay cheap to build and send
    os.environ["QFORGE_MAX_UPLOAD_BYTES"] = str(32 * 2**20)
    try:
        with in_process(folder / "hostile") as (app, settings):
            client = TestClient(app, headers={"Authorization": f"Bearer {make_key('hostile')}"})
            result = hostile_corpus.run_corpus(client, folder / "corpus", settings.data_dir, settings.max_upload_bytes)
    finally:
        del os.environ["QFORGE_MAX_UPLOAD_BYTES"]
    return {"hostile_uploads": result.sent, "hostile_accepted": len(result.accepted), "details": result.summary()}


def run_load_on(folder: Path, label: str, clients: int, duration_s: float, jobs_beside: int = 0,
                **settings: str) -> dict:
    """bench/load.py against a live `qforge serve`. `jobs_beside` real jobs are queued first,
    never cancelled, so that the worker quantizes all through the load (without them it runs
    one only when it picks a submission before its client cancels it)."""
    import httpx

    data_dir = folder / f"load-{label}"
    env = service_env(data_dir=str(data_dir), **settings)
    qforge("admin", "tenant", "create", "load", env=env)
    qforge("admin", "tenant", "quota", "load", "--max-active-jobs", "1000000", "--requests-per-minute", "0", env=env)
    key = qforge("admin", "key", "create", "--tenant", "load", "--scope", "submit", env=env).strip()
    with qforge_service(data_dir, env) as service:
        for _ in range(jobs_beside):
            httpx.post(f"{service.url}/v1/jobs", json=load.JOB, headers={"Authorization": f"Bearer {key}"},
                       timeout=120).raise_for_status()
        result = load.run_load(service.url, key, clients=clients, duration_s=duration_s)
    return {f"load_{label}": {**result.summary(), "jobs_beside": jobs_beside}}


def run_chaos(folder: Path, kills: int) -> dict:
    """bench/chaos.py against the embedded service, lost workers noticed after 15 s (as the e2e test)."""
    import httpx

    from bench import chaos

    data_dir = folder / "chaos"
    env = service_env(data_dir=str(data_dir), job_heartbeat_timeout="15")
    qforge("admin", "tenant", "create", "chaos", env=env)
    qforge("admin", "tenant", "quota", "chaos", "--max-active-jobs", "1000", "--requests-per-minute", "0", env=env)
    key = qforge("admin", "key", "create", "--tenant", "chaos", "--scope", "submit", env=env).strip()
    with qforge_service(data_dir, env) as service, \
            httpx.Client(base_url=service.url, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
        result = chaos.run_chaos(client, chaos.ServeWorker(service.pid), kills=kills,
                                 say=lambda line: print(line, flush=True))
    print(result.summary(), flush=True)
    return {"jobs_killed": len({k.job_id for k in result.kills}), "jobs_lost": len(result.lost), "kills": len(result.kills),
            "chaos_jobs": {s: sum(1 for j in result.jobs.values() if j["status"] == s) for s in ("succeeded", "failed")},
            "lost": result.lost, "chaos_seconds": round(result.seconds)}


BACKENDS = ("embedded", "postgres_redis")


@contextmanager
def backend_settings(backend: str):
    """QFORGE_* settings for a backend: none for the embedded default, or a fresh PostgreSQL
    and Redis started here."""
    if backend == "embedded":
        yield {}
        return
    with postgres() as database_url, redis_server() as broker_url:
        yield {"database_url": database_url, "broker_url": broker_url}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per backend")
    parser.add_argument("--fuzz-cases", type=int, default=40, help="positive and negative cases per operation")
    parser.add_argument("--only", nargs="*", choices=("isolation", "fuzz", "hostile", "chaos", "load"),
                        help="run only these parts (default: all)")
    parser.add_argument("--chaos-kills", type=int, default=20)
    parser.add_argument("--backends", nargs="*", choices=BACKENDS, default=list(BACKENDS),
                        help="where isolation and fuzzing run (default: both)")
    parser.add_argument("--jobs-beside", type=int, default=0,
                        help="load: real jobs queued before the clients start, so one runs all through the load")
    parser.add_argument("--worker-nice", type=int, choices=range(20), metavar="0-19",
                        help="load: the service's QFORGE_WORKER_NICE (default: the service's own default)")
    parser.add_argument("--results", type=Path, help="write the table into this RESULTS.md")
    args = parser.parse_args(argv)
    parts = set(args.only or ("isolation", "fuzz", "hostile", "chaos", "load"))
    for line in machine_header():
        print(line, flush=True)
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="qforge-reliability-") as tmp:
        folder = Path(tmp)
        for backend in args.backends if parts & {"isolation", "fuzz"} else ():
            (folder / backend).mkdir()
            with backend_settings(backend) as settings:
                if "isolation" in parts:
                    iso = figures.setdefault("isolation", {})[backend] = run_isolation(folder / backend, **settings)
                    print(f"isolation probes / leaks, {backend}: {iso['isolation_probes']} / {iso['isolation_leaks']}", flush=True)
                if "fuzz" in parts:
                    fz = figures.setdefault("fuzz", {})[backend] = run_fuzz(folder / backend, args.fuzz_cases, **settings)
                    print(f"fuzz cases / 5xx, {backend}: {fz['fuzz_cases']} / {fz['fuzz_5xx']} "
                          f"(errors not problem+json: {fz['fuzz_errors_not_problem_json']})", flush=True)
                    for example in fz["examples"]:  # at once: a later part that fails must not hide them
                        print(f"  {example}", flush=True)
        if "hostile" in parts:
            figures.update(run_hostile(folder))
            print(f"hostile uploads / accepted: {figures['hostile_uploads']} / {figures['hostile_accepted']}", flush=True)
        if "chaos" in parts:
            figures.update(run_chaos(folder, args.chaos_kills))
            print(f"jobs killed / lost: {figures['jobs_killed']} / {figures['jobs_lost']} "
                  f"({figures['kills']} kills)", flush=True)
        if "load" in parts:
            tuning = {"jobs_beside": args.jobs_beside}
            if args.worker_nice is not None:
                tuning["worker_nice"] = str(args.worker_nice)
            figures.update(run_load_on(folder, "embedded", args.clients, args.duration, **tuning))
            with postgres() as database_url, redis_server() as broker_url:
                figures.update(run_load_on(folder, "postgres_redis", args.clients, args.duration, **tuning,
                                           database_url=database_url, broker_url=broker_url))
            for label in ("embedded", "postgres_redis"):
                s = figures[f"load_{label}"]
                verdict = "meets" if s["submit_p99_ms"] < LATENCY_BUDGET_MS else "MISSES"
                print(f"submit latency at {s['clients']} clients, {label}: p50 {s['submit_p50_ms']} ms, "
                      f"p99 {s['submit_p99_ms']} ms ({verdict} p99 < {LATENCY_BUDGET_MS:.0f} ms); "
                      f"{s['submissions']} submissions, 5xx/errors {s['server_errors']}"
                      + (f"; {s['jobs_beside']} jobs queued beside" if s["jobs_beside"] else ""), flush=True)
    print(json.dumps(figures, indent=2, default=str))
    if args.results:
        write_results(args.results, figures, args)
    return 0


def write_results(path: Path, figures: dict, args) -> None:
    lines = ["## Reliability and security (bench/reliability.py)", "",
             f"Command: `python bench/reliability.py --clients {args.clients} --duration {args.duration:g} "
             f"--fuzz-cases {args.fuzz_cases} --chaos-kills {args.chaos_kills}"
             + (f" --jobs-beside {args.jobs_beside}" if args.jobs_beside else "")
             + (f" --worker-nice {args.worker_nice}" if args.worker_nice is not None else "")
             + (f" --only {' '.join(args.only)}" if args.only else "")
             + (f" --backends {' '.join(args.backends)}" if list(args.backends) != list(BACKENDS) else "")
             + " --results bench/RESULTS.md`", ""]
    lines += [f"- {line}" for line in machine_header()] + ["", "| figure | value |", "|---|---|"]
    for part, label, total, bad in (("isolation", "isolation probes / leaks", "isolation_probes", "isolation_leaks"),
                                    ("fuzz", "fuzz cases / 5xx", "fuzz_cases", "fuzz_5xx")):
        for backend, f in figures.get(part, {}).items():
            lines.append(f"| {label}, {backend} | {f[total]} / {f[bad]} |")
    for label, total, bad in (("hostile uploads / accepted", "hostile_uploads", "hostile_accepted"),
                              ("jobs killed / lost (SIGKILLed workers, embedded)", "jobs_killed", "jobs_lost")):
        if total in figures:
            lines.append(f"| {label} | {figures[total]} / {figures[bad]} |")
    if "kills" in figures:
        lines.append(f"| chaos kills; jobs succeeded / failed with reason | {figures['kills']}; "
                     f"{figures['chaos_jobs']['succeeded']} / {figures['chaos_jobs']['failed']} |")
    for label in ("embedded", "postgres_redis"):
        if (s := figures.get(f"load_{label}")) is not None:
            lines.append(f"| submit latency p50 / p99, {s['clients']} clients, {label} | {s['submit_p50_ms']} / "
                         f"{s['submit_p99_ms']} ms ({s['submissions']} submissions in {s['duration_s']} s) |")
            lines.append(f"| poll latency p50 / p99, {label} | {s['poll_p50_ms']} / {s['poll_p99_ms']} ms |")
    section = "\n".join(lines) + "\n"
    text = path.read_text() if path.exists() else ""
    start = text.find(lines[0])
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
