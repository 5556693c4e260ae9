"""A live `qforge serve` (API and a real Celery worker, on a free port) for the SDK and CLI
tests: the e2e suite's Service, one per test module."""

from __future__ import annotations

import os

import pytest

from tests.e2e.conftest import TEST_API_KEY, Service

# The fastest LLM job that still measures what a budget checks: round-to-nearest needs no
# calibration, and 512 tokens is one perplexity window (the float baseline is cached after
# the first job of the session).
FAST_JOB = {"model": "bundled:smollm2-135m", "recipe": "w4a16-rtn-g64", "evaluation": {"perplexity_tokens": 512}}


@pytest.fixture(scope="module")
def live_server(tmp_path_factory) -> str:
    """The base URL of a `qforge serve` process that lives as long as the test module. Its
    admin key is in QFORGE_API_KEY meanwhile, where the SDK and the CLI (also as a
    subprocess) find it."""
    service = Service(tmp_path_factory.mktemp("qforge-live") / "data", {})
    previous = os.environ.get("QFORGE_API_KEY")
    os.environ["QFORGE_API_KEY"] = TEST_API_KEY
    try:
        service.wait_ready()
        yield service.url
    finally:
        service.stop()
        if previous is None:
            os.environ.pop("QFORGE_API_KEY", None)
        else:
            os.environ["QFORGE_API_KEY"] = previous
    assert service.process.returncode == 0, f"qforge serve exited with {service.process.returncode}:\n{service.log_tail()}"


@pytest.fixture(scope="session")
def fast_job() -> dict:
    return dict(FAST_JOB)
