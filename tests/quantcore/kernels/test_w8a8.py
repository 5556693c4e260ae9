"""The W8A8 Triton kernels against their PyTorch references: per-token int8 quantization
bit for bit, the int8 GEMM's int32 sums exactly, the scale epilogue, and a whole W8A8 layer
against QuantizedLinear's reference path."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (its wheels are Linux-only)")

from quantcore.kernels.reference import (  # noqa: E402
    quantize_per_token_reference,
    w8a8_linear_reference,
    w8a8_reference,
)
from quantcore.kernels.w8a8 import W8A8Config, quantize_per_token, w8a8_linear, w8a8_matmul  # noqa: E402
from quantcore.schemes import QuantScheme  # noqa: E402

N = 96
W8 = QuantScheme(bits=8, granularity="channel")
A8 = QuantScheme(bits=8, granularity="token", dynamic=True)


def tokens(batch: int, k: int, device: str, seed: int = 0) -> torch.Tensor:
    """Rows whose magnitudes span four decades, as activations across tokens do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g) * torch.logspace(-2, 2, batch).view(batch, 1)
    return x.to(device)


@pytest.mark.parametrize("k", [576, 192, 100])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_quantize_per_token_is_bit_exact(device, k, batch):
    x = tokens(batch, k, device, seed=k + batch)
    q, s = quantize_per_token(x, block=64)  # several chunks per row, the last one partial when k = 100
    q_ref, s_ref = quantize_per_token_reference(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (batch,)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)


def test_quantize_per_token_rounds_half_to_even_and_handles_zero_rows(device):
    # absmax 127 makes S = 1, so the halves stay exact halves
    x = torch.tensor([[2.5, -0.5, 1.5, -3.5, 0.49, 127.0], [0.0] * 6, [-254.0, 1.0, 0.0, 0.0, 0.0, 0.0]], device=device)
    q, s = quantize_per_token(x)
    assert q[0].tolist() == [2, 0, 2, -4, 0, 127]
    assert q[1].tolist() == [0] * 6 and s[1].item() == 1.0
    assert q[2].tolist() == [-127, 0, 0, 0, 0, 0] and s[2].item() == 2.0
    q3, s3 = quantize_per_token(x.reshape(3, 1, 6).to(torch.float16))  # leading dims kept, fp16 in
    assert q3.shape == (3, 1, 6) and s3.shape == (3, 1)
    assert torch.equal(q3.reshape(3, 6), q)


@pytest.mark.parametrize("k", [576, 100])
@pytest.mark.parametrize("batch", [1, 17])
def test_int32_sums_are_exact(device, k, batch):
    """With unit scales the output is the integer sum itself: |sum| ≤ 576·128² < 2²⁴, so
    float32 holds it exactly and any error in the accumulation shows."""
    g = torch.Generator().manual_seed(k)
    x_q = torch.randint(-128, 128, (batch, k), generator=g, dtype=torch.int8).to(device)
    w_q = torch.randint(-128, 128, (N, k), generator=g, dtype=torch.int8).to(device)
    ones = torch.ones(1, device=device)
    got = w8a8_matmul(x_q, ones, w_q, ones)
    expect = (x_q.cpu().long() @ w_q.cpu().long().T).float()
    assert torch.equal(got.cpu(), expect)


@pytest.mark.parametrize("k", [576, 192])
@pytest.mark.parametrize("batch", [1, 3, 17, 70])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul_matches_reference(quantized_layer, device, k, batch, bias):
    layer = quantized_layer(N, k, W8, A8, seed=batch)
    x_q, x_scale = quantize_per_token_reference(tokens(batch, k, device))
    b = layer.bias if bias else None
    got = w8a8_matmul(x_q, x_scale, layer.qweight, layer.scale, b)
    expect = w8a8_reference(x_q, x_scale, layer.qweight, layer.scale, b)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


def test_one_weight_scale_for_the_whole_tensor(device):
    g = torch.Generator().manual_seed(1)
    x_q = torch.randint(-128, 128, (5, 192), generator=g, dtype=torch.int8).to(device)
    w_q = torch.randint(-128, 128, (N, 192), generator=g, dtype=torch.int8).to(device)
    x_scale = torch.rand(5, generator=g).to(device)
    w_scale = torch.tensor([[0.003]], device=device)
    got = w8a8_matmul(x_q, x_scale, w_q, w_scale, config=W8A8Config(16, 32, 32))
    torch.testing.assert_close(got, w8a8_reference(x_q, x_scale, w_q, w_scale), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_linear_is_the_quantized_linear_reference(quantized_layer, device, batch):
    """The whole W8A8 layer, from float x: the kernels' numbers are the artifact's numbers."""
    layer = quantized_layer(N, 576, W8, A8, seed=batch)
    x = tokens(batch, 576, device, seed=batch)
    got = w8a8_linear(x, layer.qweight, layer.scale, layer.bias)
    torch.testing.assert_close(got, w8a8_linear_reference(x, layer.qweight, layer.scale, layer.bias), rtol=1e-6, atol=1e-6)
    # QuantizedLinear sums the dequantized values in float32: rounding relative to the terms'
    # size, which can exceed an element that nearly cancels, so compare as a whole
    ref = layer.forward_reference(x)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-6


def test_linear_in_half_precision(quantized_layer, device):
    layer = quantized_layer(N, 576, W8, A8)
    x = tokens(3, 576, device).to(torch.float16)
    got = w8a8_linear(x, layer.qweight, layer.scale, layer.bias)
    assert got.dtype == torch.float16
    expect = w8a8_linear_reference(x, layer.qweight, layer.scale, layer.bias)
    # identical codes and integer sums: only the final rounding to fp16 may differ
    torch.testing.assert_close(got, expect, rtol=1e-3, atol=1e-3)


def test_rejects_float_operands(device):
    x = torch.zeros(1, 64, device=device)
    with pytest.raises(TypeError, match="int8 operands"):
        w8a8_matmul(x, torch.ones(1), torch.zeros(8, 64, dtype=torch.int8, device=device), torch.ones(8))
