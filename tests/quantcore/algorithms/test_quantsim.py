"""Simulated quantization against hand computations: the min-max S/Z of worked examples, the
clipped STE, the EMA formula, a QuantSimLayer against fake-quantizing the weight and the
input by hand before F.conv2d / F.linear, the forward-call order of DigitsCNN's layers, and
calibration against layer inputs measured with plain forward hooks on an unwrapped copy."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantcore.algorithms.dfq import fold_batchnorm
from quantcore.algorithms.quantsim import (
    QuantSimLayer,
    StaticQuantizer,
    bits_per_layer,
    calibrate_inputs,
    static_quantsim,
    weighted_layers,
    wrap_layers,
)
from quantcore.models.digits_cnn import DigitsCNN

ORDER = ["stem.0", "body1.0", "body2.0", "branch3.0", "branch1.0", "mix.0", "head"]


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread hand-offs cost more than they save


def minmax_qparams(lo, hi, bits, signed):
    """The min-max grid of [lo, hi] widened to hold 0, by hand (Python floats).
    Signed: symmetric, Z = 0, the smallest S for which both ends fit on [−2^(b−1), 2^(b−1) − 1].
    Unsigned: asymmetric, S = (hi − lo)/(2^b − 1), Z = −⌊lo/S⌉ on [0, 2^b − 1]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if signed:
        S = max(-lo / 2 ** (bits - 1), hi / (2 ** (bits - 1) - 1))
        return (S if S > 0 else 1.0), 0.0
    S = (hi - lo) / (2**bits - 1)
    S = S if S > 0 else 1.0
    return S, float(min(max(-round(lo / S), 0), 2**bits - 1))


def fake_quant(x, S, Z, bits, signed):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return (torch.clamp(torch.round(x / S) + Z, qmin, qmax) - Z) * S


def fake_quant_minmax(x, bits, signed):
    S, Z = minmax_qparams(float(x.min()), float(x.max()), bits, signed)
    return fake_quant(x, S, Z, bits, signed)


def images(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g)


# --- StaticQuantizer ------------------------------------------------------------------------


def test_signed_symmetric_scale_on_a_worked_example():
    q = StaticQuantizer(8)
    q(torch.tensor([-0.5, 0.25, 1.27, 0.0]))
    assert q.signed is True
    assert float(q.scale) == pytest.approx(0.01)  # 1.27 / 127
    assert float(q.zero_point) == 0.0
    # the negative end may use the level −128: [−2.56, 1.0] → S = 2.56/128 = 0.02
    q = StaticQuantizer(8)
    out = q(torch.tensor([-2.56, 1.0, 0.3]))
    assert float(q.scale) == pytest.approx(0.02)
    assert torch.allclose(out, torch.tensor([-2.56, 1.0, 0.3]), atol=1e-6)
    # 4 bits, [−1, 3]: S = max(1/8, 3/7) = 3/7
    q = StaticQuantizer(4)
    out = q(torch.tensor([-1.0, 3.0, 1.0]))
    assert float(q.scale) == pytest.approx(3 / 7)
    assert torch.allclose(out, torch.tensor([-2 * 3 / 7, 3.0, 2 * 3 / 7]), atol=1e-6)


def test_unsigned_asymmetric_scale_and_zero_point_on_a_worked_example():
    # post-ReLU data: unsigned grid chosen, [0, 2.55] → S = 0.01, Z = 0
    q = StaticQuantizer(8)
    q(torch.tensor([0.0, 1.0, 2.55]))
    assert q.signed is False
    assert float(q.scale) == pytest.approx(0.01) and float(q.zero_point) == 0.0
    # an asymmetric grid asked for on data with negatives: [−1, 3], 8 bits
    # S = 4/255, Z = −⌊−1/S⌉ = ⌊63.75⌉ = 64
    q = StaticQuantizer(8, signed=False)
    x = torch.tensor([-1.0, 3.0, 0.0, 0.5, -0.2])
    out = q(x)
    assert float(q.scale) == pytest.approx(4 / 255)
    assert float(q.zero_point) == 64.0
    S = 4 / 255
    expected = [(min(max(round(v / S) + 64, 0), 255) - 64) * S for v in x.tolist()]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)
    assert float(out[2]) == 0.0  # zero is exact
    # 3 bits, [0.5, 2.0] is widened to [0, 2]: S = 2/7
    q = StaticQuantizer(3)
    q(torch.tensor([0.5, 2.0]))
    assert float(q.scale) == pytest.approx(2 / 7) and float(q.zero_point) == 0.0


@pytest.mark.parametrize("bits,signed", [(3, True), (4, False), (8, True)])
def test_random_ranges_match_the_formulas(bits, signed):
    torch.manual_seed(bits)
    x = torch.randn(500) * 2 + (0.0 if signed else 0.7)
    q = StaticQuantizer(bits, signed=signed)
    out = q(x)
    S, Z = minmax_qparams(float(x.min()), float(x.max()), bits, signed)
    assert float(q.scale) == pytest.approx(S, rel=1e-6)
    assert float(q.zero_point) == Z
    assert torch.allclose(out, fake_quant(x, S, Z, bits, signed), atol=1e-5)


def test_gradient_is_the_clipped_straight_through_estimator():
    q = StaticQuantizer(4, signed=True)
    q.set_range(torch.tensor(-1.6), torch.tensor(1.4))  # S = max(1.6/8, 1.4/7) = 0.2, codes −8..7
    q.initialized.fill_(True)
    assert float(q.scale) == pytest.approx(0.2)
    # inside the range, then beyond its ends by more than half a step
    x = torch.tensor([-1.5, -0.73, 0.0, 0.31, 1.33, -1.75, -3.0, 1.55, 4.0], requires_grad=True)
    w = torch.arange(1.0, 10.0)
    (q(x) * w).sum().backward()
    assert torch.equal(x.grad, w * torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0, 0]))


def test_ema_tracking_follows_the_formula_in_training_and_freezes_in_eval():
    torch.manual_seed(0)
    m = 0.25
    q = StaticQuantizer(8, track="ema", momentum=m).train()
    batches = [torch.randn(64) * (1 + i) + 0.1 * i for i in range(5)]
    lo, hi = None, None
    for i, x in enumerate(batches):
        out = q(x)
        b_lo, b_hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        if lo is None:
            lo, hi = b_lo, b_hi  # the first batch initialises
        else:
            lo, hi = lo + m * (b_lo - lo), hi + m * (b_hi - hi)
        assert float(q.low) == pytest.approx(lo, rel=1e-5)
        assert float(q.high) == pytest.approx(hi, rel=1e-5)
        S, _ = minmax_qparams(lo, hi, 8, True)
        assert float(q.scale) == pytest.approx(S, rel=1e-5)
        assert torch.allclose(out, fake_quant(x, S, 0.0, 8, True), atol=1e-5)
    frozen = (float(q.low), float(q.high), float(q.scale))
    q.eval()
    q(torch.randn(64) * 100)
    assert (float(q.low), float(q.high), float(q.scale)) == frozen


def test_current_tracking_uses_each_tensor_in_training_only():
    q = StaticQuantizer(4, signed=True, track="current").train()
    q(torch.tensor([-1.0, 0.7]))
    q(torch.tensor([-0.5, 2.1]))
    assert float(q.scale) == pytest.approx(max(0.5 / 8, 2.1 / 7))
    q.eval()
    q(torch.tensor([-10.0, 10.0]))
    assert float(q.scale) == pytest.approx(max(0.5 / 8, 2.1 / 7))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        StaticQuantizer(1)
    with pytest.raises(ValueError):
        StaticQuantizer(9)
    with pytest.raises(ValueError):
        StaticQuantizer(8, track="always")
    with pytest.raises(RuntimeError):
        StaticQuantizer(8).finish_calibration()
    with pytest.raises(TypeError):
        QuantSimLayer(nn.ReLU(), None, None)


# --- QuantSimLayer --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_quantsim_layer_equals_fake_quant_by_hand(kind):
    torch.manual_seed(1)
    if kind == "conv":
        layer = nn.Conv2d(3, 5, 3, padding=1, stride=2)
        x = torch.relu(torch.randn(4, 3, 9, 9))
        op = lambda inp, W: F.conv2d(inp, W, layer.bias, stride=2, padding=1)  # noqa: E731
    else:
        layer = nn.Linear(12, 7)
        x = torch.randn(6, 12)
        op = lambda inp, W: F.linear(inp, W, layer.bias)  # noqa: E731
    W = layer.weight.detach().clone()
    x_signed = bool((x < 0).any())
    for bits in (8, 4):
        wrapped = QuantSimLayer(copy.deepcopy(layer), StaticQuantizer(bits), StaticQuantizer(bits))
        with torch.no_grad():
            out = wrapped(x)
            by_hand = op(fake_quant_minmax(x, bits, x_signed), fake_quant_minmax(W, bits, True))
            exact = op(x, W)
        assert torch.allclose(out, by_hand, atol=1e-5)
        error = float((out - exact).pow(2).mean() / exact.pow(2).mean())
        if bits == 8:
            assert error < 1e-4  # 8 bits stays close to the float layer
        else:
            assert error > 1e-4  # and 4 bits visibly does not (the comparison can tell)
    # no quantizers: the float layer itself
    plain = QuantSimLayer(layer, None, None)
    with torch.no_grad():
        assert torch.allclose(plain(x), op(x, W), atol=1e-6)


# --- layer order, bits, wrapping ------------------------------------------------------------


def test_weighted_layers_in_forward_call_order(seeded_cnn):
    model = seeded_cnn()
    # DigitsCNN.forward: stem, body1 → body2 (+ stem), pool, [branch3 ‖ branch1], mix, head
    assert weighted_layers(model) == ORDER
    fold_batchnorm(model)
    assert weighted_layers(model) == ORDER
    wrap_layers(model, {n: 4 for n in ORDER}, None, lambda *_: StaticQuantizer(4), lambda *_: None)
    assert all(isinstance(model.get_submodule(n), QuantSimLayer) for n in ORDER)
    assert weighted_layers(model) == ORDER


def test_weighted_layers_follows_calls_not_definitions():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 2)
            self.early = nn.Linear(3, 4)

        def forward(self, x):
            return self.late(torch.relu(self.early(x)))

    assert weighted_layers(Reversed()) == ["early", "late"]


@pytest.mark.parametrize("first_last", [8, 6, None])
def test_bits_per_layer_keeps_first_and_last(first_last, seeded_cnn):
    chosen = bits_per_layer(seeded_cnn(), 3, first_last)
    assert list(chosen) == ORDER
    ends = 3 if first_last is None else first_last
    assert chosen == {n: (ends if n in ("stem.0", "head") else 3) for n in ORDER}


# --- calibration ----------------------------------------------------------------------------


def reference_input_ranges(model, data, bits):
    """Per layer, in call order: the min and max of its input over `data`, with the earlier
    layers' inputs fake-quantized by hand on the ranges found for them; forward pre-hooks on
    an unwrapped copy of the model."""
    ranges, quantize_with = {}, {}
    for name in ORDER:
        handles, seen = [], []
        for earlier, (S, Z, signed) in quantize_with.items():
            handles.append(model.get_submodule(earlier).register_forward_pre_hook(
                lambda _m, args, S=S, Z=Z, signed=signed: (fake_quant(args[0], S, Z, bits, signed),)))
        handles.append(model.get_submodule(name).register_forward_hook(lambda _m, args, _out: seen.append(args[0])))
        with torch.no_grad():
            for batch in data:
                model(batch)
        for h in handles:
            h.remove()
        lo = min(float(x.min()) for x in seen)
        hi = max(float(x.max()) for x in seen)
        signed = bool((seen[0] < 0).any())
        ranges[name] = (lo, hi, signed)
        S, Z = minmax_qparams(lo, hi, bits, signed)
        quantize_with[name] = (S, Z, signed)
    return ranges


def test_calibrate_inputs_sees_the_model_quantized_up_to_each_layer(seeded_cnn):
    model = seeded_cnn(3)
    fold_batchnorm(model)
    data = [images(32, 0), images(32, 1) * 1.5 - 0.2]  # the second batch has negatives
    bits = 3
    reference = copy.deepcopy(model)
    expected = reference_input_ranges(reference, data, bits)
    float_ranges = reference_input_ranges(copy.deepcopy(model), data, 8)

    wrap_layers(model, {n: 8 for n in ORDER}, {n: bits for n in ORDER}, lambda *_: None,
                lambda *_: StaticQuantizer(bits, observer="minmax"))
    calibrate_inputs(model, data)
    for name in ORDER:
        q = model.get_submodule(name).input_quantizer
        lo, hi, signed = expected[name]
        assert q.signed is signed, name
        assert float(q.low) == pytest.approx(min(lo, 0.0), rel=1e-4, abs=1e-6), name
        assert float(q.high) == pytest.approx(max(hi, 0.0), rel=1e-4, abs=1e-6), name
        S, Z = minmax_qparams(lo, hi, bits, signed)
        assert float(q.scale) == pytest.approx(S, rel=1e-4), name
        assert float(q.zero_point) == Z, name
    # the reference can tell: at 3 bits the later layers' inputs differ from the float ones
    later = [n for n in ORDER[1:] if expected[n][1] != pytest.approx(float_ranges[n][1], rel=1e-3)]
    assert later
    # the calibrated model computes the hand-quantized model
    handles = [reference.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: (fake_quant(args[0], *minmax_qparams(*expected[n][:2], bits, expected[n][2]), bits,
                                          expected[n][2]),)) for n in ORDER]
    with torch.no_grad():
        assert torch.allclose(model(data[0]), reference(data[0]), atol=1e-4)
    for h in handles:
        h.remove()


def test_static_quantsim_needs_data_and_wraps_inputs_only(seeded_cnn):
    model = seeded_cnn()
    assert static_quantsim(model, None, None) == {}
    assert not any(isinstance(m, QuantSimLayer) for m in model.modules())
    for data in (None, []):
        with pytest.raises(ValueError):
            static_quantsim(copy.deepcopy(model), 4, data)
    wrapped = static_quantsim(model, 4, [images(16)], first_last_bits=8, observer="minmax")
    assert list(wrapped) == ORDER
    assert all(w.weight_quantizer is None for w in wrapped.values())
    assert [w.input_quantizer.bits for w in wrapped.values()] == [8, 4, 4, 4, 4, 4, 8]
    assert all(bool(w.input_quantizer.initialized) for w in wrapped.values())
