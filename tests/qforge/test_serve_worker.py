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


def _sessions_scheduled_as_groups() -> bool:
    """The kernel reports an autogroup only for a process it schedules in one: with autogroups
    off, or in a container whose cgroup has a CPU controller of its own, the file reads empty."""
    try:
        with open("/proc/self/autogroup") as own:
            return bool(own.read().strip())
    except OSError:
        return False


@pytest.mark.skipif(not _sessions_scheduled_as_groups(), reason="the kernel schedules no sessions as groups here (sched_autogroup off, or a cgroup's CPU controller in charge)")
def test_the_workers_own_session_is_niced_against_the_apis():
    """The worker is a session of its own; where Linux schedules sessions as groups, the
    group's nice value is what ranks the worker against the API, so it carries the setting
    too (the kernel's own report: /proc/<pid>/autogroup, '/autogroup-<n> nice <value>')."""
    child = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/autogroup').read())"],
        start_new_session=True, preexec_fn=functools.partial(_prepare_worker, 12),
        capture_output=True, text=True, check=True,
    )
    with open("/proc/self/autogroup") as own:
        assert own.read().split()[0] != child.stdout.split()[0]  # a group of its own
    assert child.stdout.split()[-1] == "12"
