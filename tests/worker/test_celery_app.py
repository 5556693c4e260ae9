"""The worker's log lines: Celery sets up its logging in the worker process; the lines
take QFORGE_LOG_FORMAT's format. Run in a fresh interpreter, as a worker starts."""

import json
import os
import subprocess
import sys

import pytest

EMIT = """
import logging
from worker.celery_app import celery_app
from app import logctx

celery_app.log.setup(loglevel="INFO")  # what `celery worker` does at start
with logctx.bound(job_id="j-42"):
    logging.getLogger("worker.tasks").info("job j-42: attempt 1 starting")
"""


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_celery_logging_takes_the_configured_format(settings, log_format):
    env = {**os.environ, "QFORGE_LOG_FORMAT": log_format}
    result = subprocess.run([sys.executable, "-c", EMIT], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    line = [text for text in result.stderr.splitlines() if "attempt 1 starting" in text][-1]
    if log_format == "json":
        parsed = json.loads(line)
        assert (parsed["level"], parsed["logger"], parsed["job_id"]) == ("info", "worker.tasks", "j-42")
    else:
        assert line.endswith(" INFO worker.tasks: job j-42: attempt 1 starting job_id=j-42")
