"""Chaos against a running service: kill its worker with SIGKILL in each stage of a job,
let it come back, and check that no job was lost.

Used by tests/e2e/test_chaos.py and by the reliability benchmark. It talks to the service
only through the HTTP client it is given (which carries whatever headers the service wants)
and kills processes found under the `qforge serve` process id it is given.

A kill hits either the pool process running the job (as the kernel's out-of-memory killer
would) or the whole worker, main process and pool (as a lost machine would); the two
alternate. Every few kills the same job is killed again in its next attempt, so a job that
has used `max_job_attempts` (2 by default) must end failed with the reason.

A job is lost when it is not finished by the deadline, when it succeeded and its artifact
does not download with the sha256 it reports, or when it failed without a reason.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import psutil

# The fastest real LLM job: RTN on the bundled SmolLM2, a short evaluation, no baseline
# (a cached baseline passes in an instant: no kill could land in it).
CHAOS_JOB = {
    "model": "bundled:smollm2-135m",
    "recipe": "w4a16-rtn-g64",
    "evaluation": {"perplexity_tokens": 1024, "baseline": False},
}
STAGES = ("load", "quantize", "evaluate", "export")  # the stages CHAOS_JOB reports
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Kill:
    job_id: str
    attempt: int
    stage: str  # the job's stage as last read before the kill
    target: str  # "pool" or "worker"
    pids: list[int]


@dataclass
class ChaosResult:
    kills: list[Kill] = field(default_factory=list)
    jobs: dict[str, dict] = field(default_factory=dict)  # id -> the job as finally read
    lost: dict[str, str] = field(default_factory=dict)  # id -> why it counts as lost
    seconds: float = 0.0

    def killed_times(self, job_id: str) -> int:
        return sum(1 for k in self.kills if k.job_id == job_id)

    def summary(self) -> str:
        by_stage = {s: sum(1 for k in self.kills if k.stage == s) for s in dict.fromkeys(k.stage for k in self.kills)}
        statuses = {s: sum(1 for j in self.jobs.values() if j["status"] == s) for s in sorted(TERMINAL)}
        lines = [
            f"jobs killed / lost (must be 0): {len({k.job_id for k in self.kills})} / {len(self.lost)}",
            f"kills: {len(self.kills)} ({', '.join(f'{s} {n}' for s, n in by_stage.items())}); "
            f"pool {sum(k.target == 'pool' for k in self.kills)}, whole worker {sum(k.target == 'worker' for k in self.kills)}",
            f"jobs: {len(self.jobs)} ({', '.join(f'{s} {n}' for s, n in statuses.items())}), {self.seconds:.0f} s",
        ]
        lines += [f"lost {job_id}: {why}" for job_id, why in self.lost.items()]
        return "\n".join(lines)


class ServeWorker:
    """The Celery worker under a `qforge serve` process: its main process is serve's child,
    and the pool processes are that one's children. serve starts a new one when it dies."""

    def __init__(self, serve_pid: int) -> None:
        self.serve = psutil.Process(serve_pid)

    def main(self) -> psutil.Process | None:
        for child in self.serve.children():
            try:
                if "celery" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    return child
            except psutil.NoSuchProcess:
                continue
        return None

    def kill(self, target: str) -> list[int]:
        main = self.main()
        if main is None:
            raise RuntimeError("no worker process under qforge serve")
        pool = main.children()
        victims = pool if target == "pool" else [main, *pool]
        for process in victims:
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return [p.pid for p in victims]


def submit(client: httpx.Client, body: dict) -> str:
    response = client.post("/v1/jobs", json=body)
    if response.status_code != 202:
        raise RuntimeError(f"submitting a job: {response.status_code} {response.text}")
    return response.json()["id"]


def get_job(client: httpx.Client, job_id: str) -> dict | None:
    """The job, or None while the API does not answer (it may be restarting)."""
    try:
        response = client.get(f"/v1/jobs/{job_id}")
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def wait_for_stage(client: httpx.Client, job_id: str, attempt: int, stage: str, timeout_s: float) -> dict:
    """Poll until the job runs `attempt` at `stage` or later; the job as last read."""
    deadline = time.monotonic() + timeout_s
    wanted = STAGES.index(stage)
    while time.monotonic() < deadline:
        job = get_job(client, job_id)
        if job is not None:
            if job["status"] in TERMINAL or job["attempts"] > attempt:
                return job
            current = job["progress"]["stage"]
            if job["status"] == "running" and job["attempts"] == attempt and current in STAGES:
                if STAGES.index(current) >= wanted:
                    return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not reach {stage} in attempt {attempt} within {timeout_s} s")


def wait_until_finished(client: httpx.Client, job_ids: list[str], deadline: float) -> dict[str, dict]:
    jobs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if job_id not in jobs and (job := get_job(client, job_id)) is not None and job["status"] in TERMINAL:
                jobs[job_id] = job
        if len(jobs) == len(job_ids):
            break
        time.sleep(1.0)
    return jobs


def check_artifact(client: httpx.Client, job: dict) -> str | None:
    """Why the job's artifact is not intact, or None when it downloads with its sha256."""
    digest, size = hashlib.sha256(), 0
    with client.stream("GET", f"/v1/jobs/{job['id']}/artifact", timeout=httpx.Timeout(30, read=300)) as response:
        if response.status_code != 200:
            return f"artifact download answered {response.status_code}"
        for chunk in response.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
    if digest.hexdigest() != job["artifact"]["sha256"]:
        return f"artifact sha256 {digest.hexdigest()} differs from the reported {job['artifact']['sha256']}"
    if size != job["artifact"]["bytes"]:
        return f"artifact has {size} bytes, the job reports {job['artifact']['bytes']}"
    return None


def judge(client: httpx.Client, job_ids: list[str], jobs: dict[str, dict]) -> dict[str, str]:
    lost = {}
    for job_id in job_ids:
        job = jobs.get(job_id) or get_job(client, job_id) or {"status": "unknown"}
        if job["status"] not in TERMINAL:
            lost[job_id] = f"still {job['status']} at the deadline"
        elif job["status"] == "failed" and not (job.get("error") or "").strip():
            lost[job_id] = "failed without a reason"
        elif job["status"] == "cancelled":
            lost[job_id] = "cancelled, though nobody asked"
        elif job["status"] == "succeeded" and (why := check_artifact(client, job)):
            lost[job_id] = why
    return lost


def run_chaos(
    client: httpx.Client,
    worker: ServeWorker,
    kills: int = 20,
    again_every: int = 5,
    body: dict = CHAOS_JOB,
    stage_timeout_s: float = 600,
    finish_timeout_s: float = 1200,
    say: Callable[[str], None] = print,
) -> ChaosResult:
    """Kill the worker `kills` times, spread over STAGES in turn; every `again_every`-th kill
    hits the previous job again in its next attempt. Returns once every job is finished or
    `finish_timeout_s` after the last kill."""
    result, job_ids = ChaosResult(), []
    started = time.monotonic()
    for index in range(kills):
        stage, target = STAGES[index % len(STAGES)], ("pool", "worker")[index % 2]
        again = bool(again_every and index % again_every == again_every - 1 and result.kills)
        if again:
            previous = result.kills[-1]
            job_id, attempt = previous.job_id, previous.attempt + 1
        else:
            job_id, attempt = submit(client, body), 1
            job_ids.append(job_id)
        job = wait_for_stage(client, job_id, attempt, stage, stage_timeout_s)
        if job["status"] in TERMINAL or job["attempts"] != attempt:
            say(f"kill {index + 1}: job {job_id} was {job['status']} (attempt {job['attempts']}) before the kill; skipped")
            continue
        pids = worker.kill(target)
        result.kills.append(Kill(job_id, attempt, job["progress"]["stage"], target, pids))
        say(f"kill {index + 1}/{kills}: {target} {pids} during {job['progress']['stage']} of job {job_id} attempt {attempt}")
    jobs = wait_until_finished(client, job_ids, time.monotonic() + finish_timeout_s)
    result.jobs = jobs
    result.lost = judge(client, job_ids, jobs)
    result.seconds = time.monotonic() - started
    return result
