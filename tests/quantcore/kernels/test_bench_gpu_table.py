"""bench/kernel_speed.py's GPU table is measured only where a GPU is lent, rarely: its code runs
here on tiny shapes through Triton's interpreter (--gpu-dry-run), so a GPU session spends
its minutes measuring, not debugging the script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (its wheels are Linux-only)")

ROOT = Path(__file__).resolve().parents[3]


def test_gpu_table_code_runs_through_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_speed.py"), "--gpu-dry-run"],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 96x256 |")]
    assert len(rows) == 2  # one per batch
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 11 and all(c != "nan" for c in cells), row  # every kernel ran, fp8 included
