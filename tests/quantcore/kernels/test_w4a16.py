"""The W4A16 Triton kernel against its PyTorch reference, on QuantizedLinear's int4 buffers:
SmolLM2's K with group 64 (and 128 where it divides), odd batch sizes, symmetric and
asymmetric, with and without split-K."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (its wheels are Linux-only)")

from quantcore.kernels import interpreting  # noqa: E402
from quantcore.kernels.reference import w4a16_reference  # noqa: E402
from quantcore.kernels.w4a16 import W4A16Config, largest_block_k, w4a16_config, w4a16_matmul  # noqa: E402
from quantcore.schemes import QuantScheme  # noqa: E402

N = 96  # one full 64-wide column tile and one masked half tile


def int4(symmetric: bool, group_size: int | None) -> QuantScheme:
    if group_size is None:
        return QuantScheme(bits=4, symmetric=symmetric, granularity="channel")
    return QuantScheme(bits=4, symmetric=symmetric, granularity="group", group_size=group_size)


def rel_error(got: torch.Tensor, expect: torch.Tensor) -> float:
    return ((got.float() - expect.float()).norm() / expect.float().norm()).item()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("k,group_size", [(576, 64), (192, 64), (384, 128)])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_matches_reference(quantized_layer, device, symmetric, k, group_size, batch):
    layer = quantized_layer(N, k, int4(symmetric, group_size), seed=batch)
    x = torch.randn(batch, k, device=device)
    expect = w4a16_reference(x, layer.qweight, layer.scale, layer.zero_point, layer.bias)
    got = w4a16_matmul(x, layer.qweight, layer.scale, layer.zero_point, layer.bias)
    assert got.shape == (batch, N) and got.dtype == x.dtype
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("split_k", [2, 4, 9])
def test_split_k_matches_reference(quantized_layer, device, symmetric, split_k):
    """K = 576 in nine 64-wide tiles: 2 and 4 splits get unequal shares, 9 one tile each."""
    layer = quantized_layer(N, 576, int4(symmetric, 64), seed=split_k)
    x = torch.randn(1, 576, device=device)
    config = W4A16Config(block_m=16, block_n=64, block_k=64, split_k=split_k)
    got = w4a16_matmul(x, layer.qweight, layer.scale, layer.zero_point, layer.bias, config=config)
    expect = w4a16_reference(x, layer.qweight, layer.scale, layer.zero_point, layer.bias)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_smaller_k_tiles_than_the_group(quantized_layer, device):
    """block_k 32 < group 128: two tiles read the same group's S and Z."""
    layer = quantized_layer(N, 384, int4(False, 128))
    x = torch.randn(3, 384, device=device)
    got = w4a16_matmul(x, layer.qweight, layer.scale, layer.zero_point, config=W4A16Config(16, 32, 32, split_k=2))
    expect = w4a16_reference(x, layer.qweight, layer.scale, layer.zero_point)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_per_channel_and_leading_dims(quantized_layer, device, symmetric):
    """Per channel is one group of K = 576 (tiles of 64); x may be (batch, seq, K)."""
    layer = quantized_layer(N, 576, int4(symmetric, None))
    x = torch.randn(2, 3, 576, device=device)
    got = w4a16_matmul(x, layer.qweight, layer.scale, layer.zero_point, layer.bias)
    assert got.shape == (2, 3, N)
    torch.testing.assert_close(got, layer.forward_reference(x), rtol=1e-5, atol=1e-5)


BF16_IN_INTERPRETER = pytest.mark.skipif(
    interpreting(),
    reason="Triton 3.9's interpreter gets bfloat16 wrong (int -> bf16 casts keep the bits, a bf16 dot of ones "
    "gives 4e9): bf16 runs on a GPU only",
)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_IN_INTERPRETER)])
def test_half_precision_activations(quantized_layer, device, dtype):
    """fp16/bf16 x: the kernel multiplies exact integer codes and scales the fp32 partial sums,
    so it lands no farther from the fp32 result than the reference (which rounds Ŵ to x's
    dtype first) does, up to the rounding of the output itself."""
    layer = quantized_layer(N, 576, int4(False, 64))
    x = torch.randn(3, 576, device=device)
    exact = w4a16_reference(x, layer.qweight, layer.scale, layer.zero_point, layer.bias)
    xh = x.to(dtype)
    got = w4a16_matmul(xh, layer.qweight, layer.scale, layer.zero_point, layer.bias)
    ref = w4a16_reference(xh, layer.qweight, layer.scale, layer.zero_point, layer.bias)
    assert got.dtype == dtype
    ulp = torch.finfo(dtype).eps
    assert rel_error(got, ref) < 4 * ulp
    assert rel_error(got, exact) <= rel_error(ref, exact) + ulp


def test_config_splits_k_only_for_small_batches():
    h200 = 132  # SMs
    decode = w4a16_config(1, 4096, 4096, 128, h200)
    assert decode.block_k == 128 and decode.split_k > 1
    # enough programs for about two per SM, never more splits than K tiles
    assert 2 * h200 <= decode.split_k * (4096 // decode.block_n) < 2 * h200 + 4096 // decode.block_n
    assert w4a16_config(1, 576, 576, 64, h200).split_k == 576 // 64
    assert w4a16_config(64, 4096, 4096, 128, h200).split_k == 1
    assert w4a16_config(1, 4096, 4096, 128, 1).split_k == 1


def test_k_tiles_divide_the_group():
    assert [largest_block_k(g) for g in (16, 64, 96, 128, 576, 4096)] == [16, 64, 32, 128, 64, 128]
    with pytest.raises(ValueError, match="multiple of 16"):
        largest_block_k(8)


def test_rejects_a_tile_that_straddles_groups(quantized_layer, device):
    layer = quantized_layer(N, 192, int4(True, 64))
    with pytest.raises(ValueError, match="must divide the group size"):
        w4a16_matmul(torch.randn(1, 192, device=device), layer.qweight, layer.scale, config=W4A16Config(16, 64, 128))
