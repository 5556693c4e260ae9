"""QuantizedLinear: packed storage reproduces the fake-quant weight exactly (the fast CPU
paths are in test_cpu_paths.py)."""

import pytest
import torch
from torch import nn

from quantcore.modules.quantized_linear import QuantizedLinear
from quantcore.qparams import calculate_qparams, fake_quant
from quantcore.schemes import QuantScheme


def linear(out=48, inp=64, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group_size", [("channel", None), ("group", 16), ("tensor", None)])
def test_dequantized_weight_equals_fake_quant(bits, symmetric, granularity, group_size):
    lin = linear()
    scheme = QuantScheme(type="int", bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    q = QuantizedLinear.from_float(lin, scheme, scale_dtype=torch.float32)
    expect = fake_quant(lin.weight.detach(), calculate_qparams(lin.weight.detach(), scheme))
    torch.testing.assert_close(q.dequantize_weight(), expect, rtol=0, atol=1e-6)
    x = torch.randn(5, 64)
    torch.testing.assert_close(q(x), nn.functional.linear(x, expect, lin.bias), rtol=1e-5, atol=1e-5)


def test_int4_storage_is_half_a_byte_per_weight():
    lin = linear(out=576, inp=1536, bias=False)
    scheme = QuantScheme(type="int", bits=4, granularity="group", group_size=64)
    q = QuantizedLinear.from_float(lin, scheme)
    assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == 576 * 1536 // 2
    assert q.storage_bytes() <= 0.30 * 576 * 1536 * 2


def test_fp8_weights():
    lin = linear()
    scheme = QuantScheme(type="fp8_e4m3", bits=8, granularity="channel")
    q = QuantizedLinear.from_float(lin, scheme, scale_dtype=torch.float32)
    assert q.qweight.dtype == torch.float8_e4m3fn
    rel = (q.dequantize_weight() - lin.weight).norm() / lin.weight.norm()
    assert rel < 0.05


@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_activation_fake_quant_matches_the_general_path_bit_for_bit(granularity, bits, dtype):
    from quantcore.modules.quantized_linear import fake_quant_activations

    torch.manual_seed(0)
    x = torch.randn(2, 64, 96) * torch.rand(96) * 5
    x[0, 3] = 0  # a silent token: S falls back to 1
    x[1, 7, :4] = 1e4  # an outlier token
    x = x.to(dtype)
    scheme = QuantScheme(bits=bits, granularity=granularity, dynamic=True)
    tokens = x.reshape(-1, 96).float()
    general = fake_quant(tokens, calculate_qparams(tokens, scheme)).reshape(x.shape).to(dtype)
    assert torch.equal(fake_quant_activations(x, scheme), general)
