"""The PyTorch references against independent computations: explicit loops over bytes,
groups and tokens on tiny cases, and the QuantizedLinear reference path on real layouts.
(Plain PyTorch: these need no Triton.)"""

import pytest
import torch

from quantcore.kernels.reference import (
    dequantize_int4,
    quantize_int4_groups_reference,
    quantize_per_token_reference,
    w4a16_reference,
    w8a8_linear_reference,
    w8a8_reference,
    w4a4_lowrank_reference,
)
from quantcore.modules.quantized_linear import fake_quant_activations
from quantcore.packing import pack_codes
from quantcore.schemes import QuantScheme


def loop_dequantize(qweight, scales, zeros, n, k, group_size):
    """Ŵ by hand: find each code's byte and nibble, subtract its group's Z, times its S."""
    flat = qweight.reshape(-1).tolist()
    w = torch.empty(n, k)
    for row in range(n):
        for col in range(k):
            index = row * k + col
            byte = flat[index // 2]
            code = byte & 0xF if index % 2 == 0 else byte >> 4
            g = col // group_size
            zero = int(zeros[row, g]) if zeros is not None else 8
            w[row, col] = (code - zero) * float(scales[row, g])
    return w


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [8, 32])
def test_dequantize_int4_matches_loops(symmetric, group_size):
    n, k = 3, 32
    g = torch.Generator().manual_seed(group_size)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales = torch.rand(n, k // group_size, generator=g) + 0.1
    zeros = None if symmetric else torch.randint(0, 16, (n, k // group_size), generator=g, dtype=torch.uint8)
    qweight = pack_codes(codes, 4)
    expect = loop_dequantize(qweight, scales, zeros, n, k, group_size)
    torch.testing.assert_close(dequantize_int4(qweight, scales, zeros, n, k), expect, rtol=0, atol=0)
    # and the matmul on top of it
    x = torch.randn(2, k, generator=g)
    torch.testing.assert_close(w4a16_reference(x, qweight, scales, zeros), x @ expect.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group_size", [("group", 64), ("channel", None), ("tensor", None)])
def test_w4a16_reference_is_quantized_linear(quantized_layer, device, symmetric, granularity, group_size):
    scheme = QuantScheme(bits=4, symmetric=symmetric, granularity=granularity, group_size=group_size)
    layer = quantized_layer(40, 192, scheme)
    x = torch.randn(3, 192, device=device)
    got = w4a16_reference(x, layer.qweight, layer.scale, layer.zero_point, layer.bias)
    torch.testing.assert_close(got, layer.forward_reference(x), rtol=0, atol=0)


def test_quantize_per_token_reference_matches_loops():
    x = torch.tensor([[0.3, -1.27, 0.005, 0.635], [0.0, 0.0, 0.0, 0.0], [2.5, -0.5, 1.5, 127.0]])
    q, s = quantize_per_token_reference(x)
    for row in range(x.shape[0]):
        values = x[row].tolist()
        scale = max(abs(v) for v in values) / 127 or 1.0
        assert s[row].item() == pytest.approx(scale, rel=1e-6)
        # Python's round() is half-to-even, as torch.round is: 2.5 -> 2, -0.5 -> 0, 1.5 -> 2
        assert q[row].tolist() == [max(-128, min(127, round(v / s[row].item()))) for v in values]
    assert q[2].tolist() == [2, 0, 2, 127]


def test_quantize_per_token_reference_is_the_activation_fake_quant():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 96) * torch.logspace(-2, 2, 5).view(1, 5, 1)
    q, s = quantize_per_token_reference(x)
    assert q.dtype == torch.int8 and s.shape == (2, 5)
    token = QuantScheme(bits=8, granularity="token", dynamic=True)
    torch.testing.assert_close(q.float() * s.unsqueeze(-1), fake_quant_activations(x, token), rtol=0, atol=0)


def test_w8a8_reference_matches_loops():
    g = torch.Generator().manual_seed(0)
    x_q = torch.randint(-128, 128, (2, 5), generator=g, dtype=torch.int8)
    w_q = torch.randint(-128, 128, (3, 5), generator=g, dtype=torch.int8)
    s_x, s_w, bias = torch.tensor([0.5, 0.25]), torch.tensor([1.0, 2.0, 0.125]), torch.tensor([1.0, -1.0, 0.0])
    y = w8a8_reference(x_q, s_x, w_q, s_w, bias)
    for m in range(2):
        for n in range(3):
            total = sum(int(x_q[m, k]) * int(w_q[n, k]) for k in range(5))
            assert y[m, n].item() == total * s_x[m].item() * s_w[n].item() + bias[n].item()


def test_w8a8_linear_reference_is_quantized_linear(quantized_layer, device):
    w8 = QuantScheme(bits=8, granularity="channel")
    a8 = QuantScheme(bits=8, granularity="token", dynamic=True)
    layer = quantized_layer(48, 192, w8, a8)
    x = torch.randn(7, 192, device=device) * torch.logspace(-1, 1, 7, device=device).view(7, 1)
    got = w8a8_linear_reference(x, layer.qweight, layer.scale, layer.bias)
    # same numbers, summed in another order: float rounding only
    torch.testing.assert_close(got, layer.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_quantize_int4_groups_reference_is_the_activation_fake_quant():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 192) * torch.logspace(-2, 2, 4).view(1, 4, 1)
    x[0, 0, 64:128] = 0  # an all-zero group: S = 1
    q, s = quantize_int4_groups_reference(x, 64)
    assert q.dtype == torch.int8 and s.shape == (3, 4, 3) and s[0, 0, 1].item() == 1.0
    assert q.min() >= -8 and q.max() <= 7
    group = QuantScheme(bits=4, granularity="group", group_size=64, dynamic=True)
    dequantized = (q.float().reshape(3, 4, 3, 64) * s.unsqueeze(-1)).reshape(x.shape)
    torch.testing.assert_close(dequantized, fake_quant_activations(x, group), rtol=0, atol=0)


def test_w4a4_lowrank_reference_matches_loops():
    n, k, rank, group_size = 3, 32, 2, 16
    g = torch.Generator().manual_seed(2)
    x_q = torch.randint(-8, 8, (2, k), generator=g, dtype=torch.int8)
    codes = torch.randint(0, 16, (n, k), generator=g)
    s_x, s_w = torch.rand(2, 2, generator=g) + 0.1, torch.rand(n, 2, generator=g) + 0.1
    act, up, bias = torch.randn(2, rank, generator=g), torch.randn(n, rank, generator=g), torch.randn(n, generator=g)
    y = w4a4_lowrank_reference(x_q, s_x, pack_codes(codes, 4), s_w, act, up, bias)
    for m in range(2):
        for col in range(n):
            total = bias[col].item() + sum(act[m, j].item() * up[col, j].item() for j in range(rank))
            for grp in range(2):
                ks = range(grp * group_size, (grp + 1) * group_size)
                dot = sum(int(x_q[m, kk]) * (int(codes[col, kk]) - 8) for kk in ks)
                total += dot * s_x[m, grp].item() * s_w[col, grp].item()
            assert y[m, col].item() == pytest.approx(total, rel=1e-6, abs=1e-6)
