"""The fast CPU paths of QuantizedLinear against the independent references of
quantcore.kernels.reference (explicit int8 sums in float64; unpack-and-dequantize for int4),
on SmolLM2's shapes and odd row counts."""

import pytest
import torch
from torch import nn

from quantcore.kernels import cpu as cpu_kernels
from quantcore.kernels.reference import (
    dequantize_int4,
    quantize_per_token_reference,
    w4a16_reference,
    w8a8_linear_reference,
    w8a8_reference,
)
from quantcore.modules import cpu_paths
from quantcore.modules.quantized_linear import QuantizedLinear, enable_fast_path
from quantcore.schemes import QuantScheme

W8 = QuantScheme(type="int", bits=8, granularity="channel")
A8_TOKEN = QuantScheme(type="int", bits=8, granularity="token", dynamic=True)
A8_TENSOR = QuantScheme(type="int", bits=8, granularity="tensor", dynamic=True)


def layer(out_features: int, in_features: int, weight: QuantScheme, act: QuantScheme | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return QuantizedLinear.from_float(nn.Linear(in_features, out_features), weight, act)


def tokens(rows: int, features: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(rows, features) * torch.linspace(0.05, 20, rows).unsqueeze(1)  # tokens of very different size


@pytest.mark.parametrize("rows", [1, 7, 33, 100])
@pytest.mark.parametrize("act", [A8_TOKEN, A8_TENSOR], ids=["per-token", "per-tensor"])
def test_int8_path_reproduces_the_int8_reference_where_the_cpu_has_vnni(rows, act):
    q = layer(1536, 576, W8, act, seed=rows)
    x = tokens(rows, 576)
    path = cpu_paths.choose(q)
    if not cpu_paths.has_vnni():
        assert path is None  # no exact int8 path here: the reference is kept unless approximation is allowed
        return
    assert isinstance(path, cpu_paths.Int8Path) and path.exact
    if act is A8_TOKEN:
        expect = w8a8_linear_reference(x, q.qweight, q.scale, q.bias)
    else:  # one scale for the whole input: the per-token map applied to the flattened tensor
        x_q, x_scale = quantize_per_token_reference(x.reshape(1, -1))
        expect = w8a8_reference(x_q.reshape(x.shape), x_scale, q.qweight, q.scale, q.bias)
    got = path(x, q)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-4 * expect.abs().max().item())
    torch.testing.assert_close(got, q.forward_reference(x), rtol=1e-4, atol=1e-4 * expect.abs().max().item())
    in_torch = cpu_paths.Int8Path(q, exact=True, use_kernels=False)(x, q)  # the same steps in PyTorch ops
    if path.engine == "fbgemm":
        assert path.row_codes is not None and torch.equal(got, in_torch)
    else:  # oneDNN's sums are fbgemm's; its fp32 epilogue may round in another order
        torch.testing.assert_close(got, in_torch, rtol=1e-6, atol=1e-6 * expect.abs().max().item())


@pytest.mark.skipif(not cpu_paths.onednn_int8_available(), reason="oneDNN's int8 path is taken on CPUs with AMX only")
@pytest.mark.parametrize("rows", [1, 16, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_int8_path_reproduces_the_int8_reference(rows, bias):
    q = layer(576, 1536, W8, A8_TOKEN, seed=rows)
    if not bias:
        q.bias = None
    x = tokens(rows, 1536).reshape(1, rows, 1536)  # leading dims kept
    path = cpu_paths.Int8Path(q, exact=True, engine="onednn")
    expect = w8a8_linear_reference(x, q.qweight, q.scale, q.bias)
    got = path(x, q)
    assert got.shape == expect.shape
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


def test_approximate_int8_path_stays_close_to_the_reference():
    q = layer(1536, 576, W8, A8_TOKEN)
    x = tokens(17, 576)
    path = cpu_paths.Int8Path(q, exact=False)
    fp32 = nn.functional.linear(x, q.dequantize_weight(), q.bias)
    err_fast = ((path(x, q) - fp32).norm() / fp32.norm()).item()
    err_ref = ((q.forward_reference(x) - fp32).norm() / fp32.norm()).item()
    assert err_fast < 2.5 * err_ref + 1e-4 and err_fast < 0.03, (err_fast, err_ref)


INT4_CASES = [
    ((1536, 576), QuantScheme(type="int", bits=4, granularity="group", group_size=64)),
    ((576, 1536), QuantScheme(type="int", bits=4, granularity="group", group_size=128)),
    ((576, 1536), QuantScheme(type="int", bits=4, symmetric=False, granularity="group", group_size=64)),
    ((96, 200), QuantScheme(type="int", bits=4, granularity="channel")),  # K not a multiple of the vector width
    ((64, 40), QuantScheme(type="int", bits=4, symmetric=False, granularity="group", group_size=20)),  # ragged groups
]


@pytest.fixture(scope="module")
def int4_kernel():
    if not cpu_kernels.available():  # a C++ compiler is part of the test machine
        pytest.fail(f"the int4 CPU kernel did not build: {cpu_kernels.unavailable_reason()}")


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("shape,scheme", INT4_CASES, ids=lambda v: str(v) if isinstance(v, tuple) else v.short_name())
def test_int4_kernel_matches_the_unpack_and_dequantize_reference(int4_kernel, rows, shape, scheme):
    q = layer(*shape, scheme, seed=rows)
    x = tokens(rows, shape[1])
    path = cpu_paths.choose(q)
    assert isinstance(path, cpu_paths.Int4Path)
    expect = w4a16_reference(x, q.qweight, q.scale, q.zero_point, q.bias)
    torch.testing.assert_close(path(x, q), expect, rtol=1e-5, atol=2e-5 * expect.abs().max().item())


@pytest.mark.parametrize("shape,scheme", INT4_CASES, ids=lambda v: str(v) if isinstance(v, tuple) else v.short_name())
def test_int4_kernel_dequantizes_exactly_as_the_reference(int4_kernel, shape, scheme):
    q = layer(*shape, scheme)
    path = cpu_paths.choose(q)
    got = cpu_kernels.load().w4_dequantize(q.qweight, path.scales, path.zeros, shape[1])
    assert torch.equal(got, dequantize_int4(q.qweight, q.scale, q.zero_point, *shape))


def test_int4_above_decode_sizes_matches_the_reference_and_other_dtypes_round_trip(int4_kernel):
    q = layer(1536, 576, INT4_CASES[0][1])
    enable_fast_path(nn.Sequential(q))
    for rows in (cpu_kernels.MAX_ROWS + 1, 300):  # prefill: Ŵ in blocks of rows, each block BLAS
        x = tokens(rows, 576)
        expect = w4a16_reference(x, q.qweight, q.scale, None, q.bias)
        torch.testing.assert_close(q(x), expect, rtol=1e-5, atol=2e-5 * expect.abs().max().item())
    xb = tokens(2, 576).to(torch.bfloat16)
    y = q(xb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), w4a16_reference(xb.float(), q.qweight, q.scale, None, q.bias),
                               rtol=1e-2, atol=1e-2 * y.float().abs().max().item())


def test_dispatch_is_off_by_default_and_counted_when_enabled(int4_kernel):
    int4 = layer(1536, 576, INT4_CASES[0][1])
    int8 = layer(1536, 576, W8, A8_TOKEN)
    no_path = layer(64, 64, QuantScheme(type="int", bits=3, granularity="channel"))
    model = nn.Sequential(int4, int8, no_path)
    x = tokens(1, 576)
    assert int4.fast_path == "off" and torch.equal(int4(x), int4.forward_reference(x))
    expected = 1 + int(cpu_paths.has_vnni() and cpu_paths.fbgemm_available())
    assert enable_fast_path(model) == expected
    assert not no_path.has_fast_path
    assert enable_fast_path(model, approximate=True) == 1 + int(cpu_paths.fbgemm_available())
    assert enable_fast_path(model, enabled=False) == 0


def test_without_the_kernel_int4_layers_keep_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_failed", "no C++ compiler")
    q = layer(1536, 576, INT4_CASES[0][1])
    assert enable_fast_path(nn.Sequential(q)) == 0
    x = tokens(1, 576)
    assert torch.equal(q(x), q.forward_reference(x))
