"""Releasing memory-mapped weights: resident memory really drops, the bytes read back are the
file's, and memory that is not a file's is never touched."""

import os
import sys

import numpy as np
import pytest
import torch

from quantcore.memory import release_file_pages, release_replaced, spill_float_weights, spill_rewritten_weights, trim_heap

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


def test_rewritten_weights_are_spilled_to_a_file_and_released_page_by_page(tmp_path):
    """After a transforming stage rewrites weights in place they live in anonymous memory;
    spilled, they are the same values mapped from a file, so releasing their pages (as the
    block-by-block pass does) drops resident memory and reads the same values back."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # as smoothing folds scales in: a fresh anonymous copy
    tied = torch.nn.Linear(1024, 4096)
    tied.weight = model[0].weight  # tied weights are spilled once and stay tied
    model.add_module("tied", tied)
    x = torch.randn(8, 1024)
    expected = model(x).detach().clone()
    expected_weight = model[0].weight.detach().clone()
    assert release_file_pages(model[0].weight) == 0  # anonymous: nothing to release yet

    spilled = spill_float_weights(model, tmp_path / "spill" / "stage1.pt")

    assert spilled == sum(p.numel() * 4 for p in (model[0].weight, model[2].weight, model[0].bias, model[2].bias)
                          if p.numel() * 4 >= 1 << 20)
    assert not (tmp_path / "spill" / "stage1.pt").exists()  # unlinked, kept alive by the mapping
    assert model.tied.weight is model[0].weight
    assert torch.equal(model(x), expected)
    assert float(model[0].weight.detach().sum()) != 0  # touch every page
    before = resident_bytes()
    assert release_file_pages(model[0].weight) >= (16 << 20) - 8192
    assert before - resident_bytes() >= 12 << 20
    assert torch.equal(model[0].weight, expected_weight)  # read back from the file
    assert spill_float_weights(model, tmp_path / "again.pt") == 0  # already file-backed


def test_release_replaced_drops_only_weights_the_model_no_longer_holds(tmp_path):
    """What RTN does after each layer: the replaced layer's mapped weight leaves memory; a
    weight still in the model (here the other layer's) is not touched."""
    path = tmp_path / "weights.bin"
    np.arange(2 * (4 << 20), dtype=np.float32).tofile(path)  # two 16 MiB weights
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c")).reshape(2, 2048, 2048)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 2048, bias=False), torch.nn.Linear(2048, 2048, bias=False))
    replaced, kept = model[0], model[1]
    replaced.weight = torch.nn.Parameter(mapped[0], requires_grad=False)
    kept.weight = torch.nn.Parameter(mapped[1], requires_grad=False)
    assert float(mapped.sum()) > 0  # touch every page
    model[0] = torch.nn.Identity()  # as a quantized layer replaces the float one
    before = resident_bytes()

    released = release_replaced(model, [replaced.weight, kept.weight])

    assert (15 << 20) <= released <= (16 << 20)
    assert before - resident_bytes() >= 12 << 20
    assert torch.equal(kept.weight[0, :4], torch.tensor([0.0, 1.0, 2.0, 3.0]) + 4 * (1 << 20))


def test_weights_rewritten_in_place_on_a_file_mapping_are_spilled_not_reverted(tmp_path):
    """A smoothing stage folds scales into mapped weights in place: their pages become private
    copies inside the file's mapping. Spilled, the module keeps the rewritten values (not the
    file's), and resident memory drops by about their size."""
    path = tmp_path / "weights.bin"
    np.arange(8 << 20, dtype=np.float32).tofile(path)  # 32 MiB
    weight = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c")).reshape(2048, 4096)
    layer = torch.nn.Linear(4096, 2048, bias=False)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    with torch.no_grad():
        layer.weight.mul_(3.0)  # every page copied on write
    before = resident_bytes()

    spilled = spill_rewritten_weights(layer, tmp_path / "spill" / "block0.pt")

    assert spilled == 32 << 20
    assert before - resident_bytes() >= 24 << 20
    assert torch.equal(layer.weight[1, :3], 3.0 * torch.tensor([4096.0, 4097.0, 4098.0]))
    assert np.fromfile(path, dtype=np.float32, count=3).tolist() == [0.0, 1.0, 2.0]  # the source file untouched
