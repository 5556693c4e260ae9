"""The CLI and the CI example (examples/ci_quantize.sh) as a pipeline runs them: real
processes against a live `qforge serve`, judged by their output and exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from qforge.client import Client
from quantcore.recipe import PRESETS
from tests.e2e.conftest import TEST_API_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ci_quantize.sh"


@pytest.fixture(scope="module")
def env(tmp_path_factory, live_server) -> dict[str, str]:
    """The environment of a CI step: `qforge` on the PATH (this checkout's CLI, this
    interpreter) and QFORGE_SERVER pointing at the live server."""
    bin_dir = tmp_path_factory.mktemp("bin")
    script = bin_dir / "qforge"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qforge.cli "$@"\n')
    script.chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if k not in ("QFORGE_SERVER", "QFORGE_API_KEY")}
    environ["QFORGE_API_KEY"] = TEST_API_KEY  # the live server's admin key
    pythonpath = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH")) if p)
    return {**environ, "PATH": f"{bin_dir}{os.pathsep}{environ['PATH']}", "PYTHONPATH": pythonpath,
            "QFORGE_SERVER": live_server}


@pytest.fixture(scope="module")
def cli(env):
    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["qforge", *args], env={**env, **extra_env}, capture_output=True, text=True, timeout=600)

    return run


def run_example(env: dict[str, str], folder: Path, **settings: str) -> subprocess.CompletedProcess:
    step = {"MODEL": "bundled:smollm2-135m", "RECIPE": "w4a16-rtn-g64", "EVAL_TOKENS": "512", **settings}
    return subprocess.run(["bash", str(EXAMPLE)], env={**env, **step}, cwd=folder, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def example(env, tmp_path_factory):
    """The example, through the server, twice in one pipeline run: a budget it meets, then
    one it misses."""
    folder, run_id = tmp_path_factory.mktemp("ci"), uuid.uuid4().hex
    passing = run_example(env, folder, QFORGE_RUN_ID=run_id, MAX_PERPLEXITY_RATIO="2.0", OUT=str(folder / "pass"))
    failing = run_example(env, folder, QFORGE_RUN_ID=run_id, MAX_PERPLEXITY_RATIO="1.05", OUT=str(folder / "fail"))
    return folder, passing, failing


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def succeeded_job(stderr: str) -> str:
    return re.search(r"job ([0-9a-f]{32}) succeeded", stderr).group(1)


def test_the_ci_example_passes_within_its_budget_and_fails_past_it(example, live_server):
    folder, passing, failing = example
    assert passing.returncode == 0, passing.stderr
    [archive] = (folder / "pass").glob("qforge-*.tar")
    job_id = succeeded_job(passing.stderr)
    assert archive.name == f"qforge-{job_id}.tar"
    with Client(live_server) as qf:
        job, report = qf.get(job_id), qf.report(job_id)
    assert sha256(archive) == job.artifact.sha256
    ratio = report["metrics"]["quantized"]["perplexity"] / report["metrics"]["baseline"]["perplexity"]
    assert 1.05 < ratio < 2.0
    assert f"PASS  perplexity_ratio <= 2  (is {ratio:.6g})" in passing.stdout

    assert failing.returncode == 6, failing.stderr
    assert f"FAIL  perplexity_ratio <= 1.05  (is {ratio:.6g})" in failing.stdout
    assert "budget exceeded" in failing.stderr and not (folder / "fail").exists()  # nothing kept past the budget
    assert succeeded_job(failing.stderr) == job_id  # the same pipeline run found its job: no second quantization


def test_status_report_download_cancel_and_presets(cli, example, live_server, tmp_path):
    job_id = succeeded_job(example[1].stderr)
    with Client(live_server) as qf:
        job, report = qf.get(job_id), qf.report(job_id)

    status = cli("status", job_id)
    assert status.returncode == 0 and "status    succeeded" in status.stdout
    assert json.loads(cli("status", job_id, "--json").stdout) == job.model_dump(mode="json")
    assert json.loads(cli("report", job_id, "--json").stdout) == report

    download = cli("download", job_id, "--out", str(tmp_path / "model.tar"))
    assert download.returncode == 0 and download.stdout.strip() == str(tmp_path / "model.tar")
    assert sha256(tmp_path / "model.tar") == job.artifact.sha256 and "sha256 verified" in download.stderr

    cancel = cli("cancel", job_id)
    assert cancel.returncode == 2 and "already succeeded" in cancel.stderr  # 409: a 4xx is bad input
    presets = cli("presets")
    assert [line.split()[0] for line in presets.stdout.splitlines()] == list(PRESETS)

    for check in ("perplexity_ratio=<1", "no_such_metric<=1"):
        assert cli("report", job_id, "--check", check).returncode == 2


def test_exit_codes_for_bad_input_a_failed_job_a_timeout_and_no_server(cli, tmp_path, closed_port):
    bad = cli("submit", "bundled:smollm2-135m", "--recipe", "no-such-preset")
    assert bad.returncode == 2 and "unknown preset 'no-such-preset'" in bad.stderr
    assert cli("submit", "bundled:smollm2-135m", "--recipe", str(tmp_path / "missing.yaml")).returncode == 2
    ftp = cli("submit", "bundled:smollm2-135m", "--recipe", "w8a16-rtn", "--callback-url", "ftp://127.0.0.1/hook")
    assert ftp.returncode == 2 and "callback_url" in ftp.stderr  # the API's validation, naming the field

    recipe = tmp_path / "g7.yaml"  # a group size that divides no layer: found only when the job runs
    weights = "{type: int, bits: 4, granularity: group, group_size: 7}"
    recipe.write_text(f"name: g7\nstages:\n  - algorithm: rtn\n    weights: {weights}\n")
    failed = cli("submit", "bundled:smollm2-135m", "--recipe", str(recipe), "--perplexity-tokens", "512", "--wait")
    assert failed.returncode == 3 and "group_size 7" in failed.stderr
    assert cli("status", failed.stdout.strip()).returncode == 3

    slow = cli("submit", "bundled:smollm2-135m", "--recipe", "w8a16-rtn", "--perplexity-tokens", "512",
               "--wait", "--timeout", "1")
    assert slow.returncode == 4 and "after 1 s" in slow.stderr
    job_id = slow.stdout.strip()
    assert cli("cancel", job_id).returncode == 0
    cancelled = cli("wait", job_id, "--timeout", "300")
    assert cancelled.returncode == 3 and "cancelled" in cancelled.stderr

    nobody = cli("presets", QFORGE_SERVER=f"http://127.0.0.1:{closed_port}")
    assert nobody.returncode == 5 and "Server unreachable" in nobody.stderr


def test_quantize_runs_the_same_job_locally(env, example, live_server, tmp_path, cli):
    local = {k: v for k, v in env.items() if k != "QFORGE_SERVER"}
    out = tmp_path / "out"
    step = run_example(local, tmp_path, MAX_PERPLEXITY_RATIO="2.0", OUT=str(out))
    assert step.returncode == 0, step.stderr
    assert step.stdout.splitlines()[0] == str(out / "artifact")
    report = json.loads((out / "artifact" / "report.json").read_text())
    with Client(live_server) as qf:
        served = qf.report(succeeded_job(example[1].stderr))
    # the worker's pipeline, run here: the same request measures the same model
    assert report["request"] == served["request"]
    perplexity = served["metrics"]["quantized"]["perplexity"]
    assert report["metrics"]["quantized"]["perplexity"] == pytest.approx(perplexity, rel=1e-4)
    assert not (out / "spill").exists()

    over = subprocess.run(["qforge", "report", str(out), "--check", "perplexity_ratio<=1.05"], env=local,
                          capture_output=True, text=True, timeout=120)
    assert over.returncode == 6 and "FAIL  perplexity_ratio <= 1.05" in over.stdout
