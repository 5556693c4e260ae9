"""Compiled kernels on a CUDA GPU: full-size SmolLM2 and 7B-class shapes against the
references, and W4A16 decoding faster than fp16 cuBLAS. Skipped (with the reason) without a
GPU; the interpreter tests beside this file cover the same code on small shapes.
The issue's speed targets are measured by bench/kernels.py, not here: this only catches a
kernel that lost its reason to exist."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed (its wheels are Linux-only)")

from quantcore.kernels import interpreting  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or interpreting(),
    reason="needs a CUDA device running compiled kernels (TRITON_INTERPRET unset); "
    "the small-shape interpreter tests cover the same kernels on CPU",
)

from quantcore.kernels.reference import w4a16_reference, w8a8_linear_reference  # noqa: E402
from quantcore.kernels.w4a16 import w4a16_matmul  # noqa: E402
from quantcore.kernels.w8a8 import w8a8_linear  # noqa: E402
from quantcore.schemes import QuantScheme  # noqa: E402

# (out N, in K): SmolLM2-135M's MLP up and down projections, a 7B model's square and MLP layers
SHAPES = [(1536, 576), (576, 1536), (4096, 4096), (11008, 4096)]


def rel_error(got: torch.Tensor, expect: torch.Tensor) -> float:
    return ((got.float() - expect.float()).norm() / expect.float().norm()).item()


def group_size_for(k: int) -> int:
    return 128 if k % 128 == 0 else 64


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("batch", [1, 16, 64])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_w4a16_full_size_fp16(quantized_layer, n, k, batch, symmetric):
    scheme = QuantScheme(bits=4, symmetric=symmetric, granularity="group", group_size=group_size_for(k))
    layer = quantized_layer(n, k, scheme)
    x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
    got = w4a16_matmul(x, layer.qweight, layer.scale, layer.zero_point, layer.bias)
    expect = w4a16_reference(x.float(), layer.qweight, layer.scale, layer.zero_point, layer.bias)
    assert rel_error(got, expect) < 2e-3  # fp16 inputs and output, fp32 accumulation


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_w8a8_full_size_fp16(quantized_layer, n, k, batch):
    w8 = QuantScheme(bits=8, granularity="channel")
    a8 = QuantScheme(bits=8, granularity="token", dynamic=True)
    layer = quantized_layer(n, k, w8, a8)
    x = torch.randn(batch, k, device="cuda", dtype=torch.float16)
    got = w8a8_linear(x, layer.qweight, layer.scale, layer.bias)
    expect = w8a8_linear_reference(x, layer.qweight, layer.scale, layer.bias)
    assert rel_error(got, expect) < 2e-3


def test_w4a16_decode_beats_fp16(quantized_layer):
    """Batch 1 on 11008 x 4096 is bandwidth: a quarter of fp16's weight bytes must show."""
    from triton.testing import do_bench

    n, k = 11008, 4096
    layer = quantized_layer(n, k, QuantScheme(bits=4, granularity="group", group_size=128))
    w16 = layer.dequantize_weight(torch.float16)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    fp16_ms = do_bench(lambda: F.linear(x, w16), return_mode="median")
    w4_ms = do_bench(lambda: w4a16_matmul(x, layer.qweight, layer.scale), return_mode="median")
    print(f"\n11008x4096 batch 1: fp16 {fp16_ms * 1e3:.1f} us, W4A16 {w4_ms * 1e3:.1f} us, {fp16_ms / w4_ms:.2f}x")
    assert fp16_ms / w4_ms > 1.0
