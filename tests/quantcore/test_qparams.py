"""qparams against the seed's worked int4 example and against the grid's invariants."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcore.qparams import (
    QuantizationError,
    calculate_qparams,
    dequantize,
    fake_quant,
    qparams_from_range,
    quantize,
    requantize,
)
from quantcore.schemes import QuantScheme

W = torch.tensor([0.1, 0.2, 1.2, 3, 2.1, -2.1, -3.5])


def int_scheme(bits=4, symmetric=True, granularity="tensor", group_size=None):
    return QuantScheme(type="int", bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)


def test_worked_example_symmetric_int4():
    qp = calculate_qparams(W, int_scheme())
    q = quantize(W, qp)
    assert q.tolist() == [0, 0, 2, 6, 4, -4, -7]
    assert dequantize(q, qp).tolist() == [0, 0, 1, 3, 2, -2, -3.5]
    assert qp.scale.item() == 0.5  # the seed's "scale" 2 is 1/S


def test_worked_example_asymmetric_int4():
    qp = calculate_qparams(W, int_scheme(symmetric=False))
    q = quantize(W, qp)
    assert q.tolist() == [8, 8, 11, 15, 13, 3, 0]
    assert qp.zero_point.item() == 8  # the seed writes round(min·scale) = -8
    deq = [round(v, 3) for v in dequantize(q, qp).tolist()]
    assert deq == [0, 0, 1.3, 3.033, 2.167, -2.167, -3.467]


def test_group_size_must_divide():
    with pytest.raises(QuantizationError, match="group_size 7 does not divide the input dimension 576"):
        calculate_qparams(torch.randn(4, 576), int_scheme(granularity="group", group_size=7))


@pytest.mark.parametrize("bad", [{"bits": 1}, {"bits": 9}, {"granularity": "group"}, {"group_size": 64}])
def test_scheme_rejects_impossible(bad):
    with pytest.raises(ValueError):
        QuantScheme(**{"type": "int", "bits": 4, **bad})


def test_per_channel_and_group_match_naive():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    qp = calculate_qparams(w, int_scheme(granularity="group", group_size=4))
    deq = fake_quant(w, qp)
    for r in range(6):
        for g in range(4):
            block = w[r, 4 * g : 4 * g + 4]
            s = block.abs().max() / 7
            expect = torch.clamp(torch.round(block / s), -8, 7) * s
            torch.testing.assert_close(deq[r, 4 * g : 4 * g + 4], expect)
    qc = calculate_qparams(w, int_scheme(granularity="channel"))
    torch.testing.assert_close(qc.scale.flatten(), w.abs().amax(1) / 7)


def test_per_token_dynamic():
    x = torch.randn(2, 3, 8)
    scheme = QuantScheme(type="int", bits=8, granularity="token", dynamic=True)
    qp = calculate_qparams(x, scheme)
    assert qp.scale.shape == (6, 1)
    torch.testing.assert_close(qp.scale.flatten(), x.reshape(6, 8).abs().amax(1) / 127)


@pytest.mark.parametrize("fmt,fmax", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_round_trip(fmt, fmax):
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    scheme = QuantScheme(type=fmt, bits=8, granularity="channel")
    qp = calculate_qparams(x, scheme)
    torch.testing.assert_close(qp.scale.flatten(), x.abs().amax(1) / fmax)
    q = quantize(x, qp)
    assert q.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    # relative precision of the format: 3 (e4m3) or 2 (e5m2) mantissa bits
    rel = 2.0 ** -(4 if fmt == "fp8_e4m3" else 3)
    err = (dequantize(q, qp) - x).abs()
    assert (err <= rel * x.abs() + 1e-6 * x.abs().amax()).all()


def test_requantize_between_grids():
    x = torch.linspace(-1, 1, 101)
    a = calculate_qparams(x, int_scheme(bits=8))
    b = qparams_from_range(torch.tensor([[-2.0]]), torch.tensor([[2.0]]), int_scheme(bits=8))
    q = requantize(quantize(x, a), a, b)
    torch.testing.assert_close(dequantize(q, b), fake_quant(fake_quant(x, a), b))


floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(floats, min_size=1, max_size=64),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
)
def test_properties_round_trip_bounds_idempotence(values, bits, symmetric):
    x = torch.tensor(values, dtype=torch.float32)
    qp = calculate_qparams(x, int_scheme(bits=bits, symmetric=symmetric))
    q = quantize(x, qp)
    # codes inside [l, u]
    assert q.float().min() >= qp.qmin and q.float().max() <= qp.qmax
    # inside the observed range, round trip errs by at most S/2 (plus float slack)
    xhat = dequantize(q, qp)
    slack = 1e-5 * max(1.0, x.abs().max().item())
    assert ((xhat - x).abs() <= qp.scale / 2 + slack).all()
    # fake quant is idempotent: quantized values are on the grid
    once = fake_quant(x, qp)
    torch.testing.assert_close(fake_quant(once, qp), once, rtol=0, atol=slack)
