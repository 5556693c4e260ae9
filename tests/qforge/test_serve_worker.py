"""How `qforge serve` prepares its worker process before exec."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from qforge.serve import _prepare_worker


@pytest.mark.parametrize("nice", [7, 0])
def test_the_worker_runs_as_much_lower_in_cpu_priority_as_asked(nice):
    """As the operating system reports it from inside the child (0: serve's own priority)."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.nice(0))"],
        preexec_fn=functools.partial(_prepare_worker, nice), capture_output=True, text=True, check=True,
    )
    assert int(child.stdout) == min(19, os.nice(0) + nice)
