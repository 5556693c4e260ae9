"""Load on loopback: N concurrent clients, each submitting a job, polling it a few times and
cancelling it, over and over for a fixed time. Reports submit and poll latency percentiles
and the answers by status.

Clients are asyncio tasks on one event loop (one process, so the measuring costs little
CPU beside the server's on a small machine), each with one keep-alive connection of
bench/loopback_http.py: httpx cost about 3 ms of CPU a request here, a quarter of a core
at 50 clients taken from the server it measured, and its responses waited for that loop.
Each submitted job is cancelled after its polls, so the worker skips most jobs; it runs one
only when it picks a submission before its client cancels it (bench/reliability.py's
--jobs-beside queues real jobs first, to keep one running all through). What is measured is
the API, its database and its broker under submissions, as a CI fleet makes them.
Clients start at random moments (seeded) within their first cycle, as a fleet of pipelines
does: started in the same millisecond, 50 clients stay in step, their requests arriving in
bursts of 50 at once every second (`synchronized=True` measures that).
Bounded: loopback only, a fixed duration, a fixed number of clients.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import httptools

from bench.loopback_http import LoopbackClient

JOB = {"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64", "evaluation": {"perplexity_tokens": 512}}
POLLS_PER_JOB = 3
POLL_INTERVAL_S = 1.0  # as a pipeline polls (the SDK waits on server-sent events instead)
CYCLE_S = POLLS_PER_JOB * POLL_INTERVAL_S  # a client's submit-poll-cancel round, less its requests' time


@dataclass
class LoadResult:
    clients: int
    duration_s: float
    submit_ms: list[float] = field(default_factory=list)  # accepted (202) submissions only
    poll_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)  # "submit 202", "poll 200", "cancel 200", "error ..."

    def percentile(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]

    @property
    def server_errors(self) -> int:
        return sum(n for key, n in self.statuses.items() if key.split()[-1].startswith("5") or key.startswith("error"))

    def summary(self) -> dict:
        return {
            "clients": self.clients, "duration_s": round(self.duration_s, 1), "submissions": len(self.submit_ms),
            "submit_p50_ms": round(self.percentile(self.submit_ms, 50), 1),
            "submit_p99_ms": round(self.percentile(self.submit_ms, 99), 1),
            "poll_p50_ms": round(self.percentile(self.poll_ms, 50), 1),
            "poll_p99_ms": round(self.percentile(self.poll_ms, 99), 1),
            "server_errors": self.server_errors, "statuses": dict(sorted(self.statuses.items())),
        }


async def _client(client: LoopbackClient, stop_at: float, result: LoadResult, start_after_s: float) -> None:
    await asyncio.sleep(start_after_s)
    async with client:
        while time.monotonic() < stop_at:
            try:
                started = time.perf_counter()
                submitted = await client.post("/v1/jobs", json=JOB)
                elapsed = (time.perf_counter() - started) * 1000
                result.statuses[f"submit {submitted.status_code}"] += 1
                if submitted.status_code != 202:
                    await asyncio.sleep(1.0)
                    continue
                result.submit_ms.append(elapsed)
                job_id = submitted.json()["id"]
                for _ in range(POLLS_PER_JOB):
                    await asyncio.sleep(POLL_INTERVAL_S)
                    started = time.perf_counter()
                    polled = await client.get(f"/v1/jobs/{job_id}")
                    result.poll_ms.append((time.perf_counter() - started) * 1000)
                    result.statuses[f"poll {polled.status_code}"] += 1
                cancelled = await client.post(f"/v1/jobs/{job_id}/cancel")
                result.statuses[f"cancel {cancelled.status_code}"] += 1
            except (OSError, TimeoutError, httptools.HttpParserError) as exc:
                result.statuses[f"error {type(exc).__name__}"] += 1


async def _warm_up(base_url: str, api_key: str) -> None:
    """One submission first, untimed: the API imports the model registry (torch, transformers)
    on the first job it checks, seconds that belong to its start, not to the load."""
    import httpx

    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as client:
        submitted = await client.post("/v1/jobs", json=JOB)
        submitted.raise_for_status()
        await client.post(f"/v1/jobs/{submitted.json()['id']}/cancel")


async def _run(base_url: str, api_key: str, clients: int, duration_s: float, seed: int, synchronized: bool) -> LoadResult:
    await _warm_up(base_url, api_key)
    result = LoadResult(clients, duration_s)
    rng = random.Random(seed)
    start_after = [0.0 if synchronized else rng.uniform(0, CYCLE_S) for _ in range(clients)]
    headers = {"Authorization": f"Bearer {api_key}"}
    made = [LoopbackClient(base_url, headers) for _ in range(clients)]
    stop_at = time.monotonic() + duration_s
    started = time.monotonic()
    await asyncio.gather(*(_client(client, stop_at, result, delay) for client, delay in zip(made, start_after)))
    result.duration_s = time.monotonic() - started
    return result


def run_load(base_url: str, api_key: str, clients: int = 50, duration_s: float = 60.0, seed: int = 0,
             synchronized: bool = False) -> LoadResult:
    return asyncio.run(_run(base_url, api_key, clients, duration_s, seed, synchronized))
