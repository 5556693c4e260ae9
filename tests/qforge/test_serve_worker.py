"""How `qforge serve` prepares its worker process before exec."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

from qforge.serve import _prepare_worker


def test_the_worker_runs_at_a_lower_cpu_priority_than_serve():
    """As the operating system reports it from inside the child."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.nice(0))"],
        preexec_fn=functools.partial(_prepare_worker, 7), capture_output=True, text=True, check=True,
    )
    assert int(child.stdout) == min(19, os.nice(0) + 7)


def test_nice_zero_keeps_the_worker_at_serve_s_priority():
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.nice(0))"],
        preexec_fn=functools.partial(_prepare_worker, 0), capture_output=True, text=True, check=True,
    )
    assert int(child.stdout) == os.nice(0)
