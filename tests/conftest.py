"""Shared fixtures. Tests run with a private cache and data folder so they never touch a
user's ~/.cache/qforge, and with 2 torch threads (the machine's cores)."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def _private_qforge_cache(tmp_path_factory):
    if "QFORGE_TEST_KEEP_CACHE" not in os.environ:
        os.environ.setdefault("QFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("qforge-cache")))
    yield
