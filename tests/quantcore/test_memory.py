"""Releasing memory-mapped weights: resident memory really drops, the bytes read back are the
file's, and memory that is not a file's is never touched."""

import os
import sys

import numpy as np
import pytest
import torch

from quantcore.memory import release_file_pages, trim_heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses madvise (Linux)")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_file_backed_pages_are_released_and_read_back_from_the_file(tmp_path):
    values = np.arange(8 << 20, dtype=np.float32)  # 32 MiB
    path = tmp_path / "weights.bin"
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="c")  # private, as safetensors maps weights
    tensor = torch.from_numpy(mapped)
    assert float(tensor.sum()) > 0  # touch every page
    before = resident_bytes()
    released = release_file_pages(tensor)
    assert released >= 31 << 20
    assert before - resident_bytes() >= 24 << 20
    assert torch.equal(tensor[:1000], torch.arange(1000, dtype=torch.float32))  # re-read from the file


def test_anonymous_memory_is_left_alone():
    tensor = torch.arange(1 << 20, dtype=torch.float32)
    assert release_file_pages(tensor) == 0
    assert torch.equal(tensor, torch.arange(1 << 20, dtype=torch.float32))
    trim_heap()  # harmless at any time
