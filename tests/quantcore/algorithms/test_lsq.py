"""LSQ and LSQ+ against the papers: the forward map written out naively, the step-size
gradient of LSQ's eq. 3 written out and by central finite differences of a frozen-rounding
surrogate (float64), the gradient scale g = 1/√(N·Q_P), the initialisation 2⟨|v|⟩/√Q_P,
LSQ+'s offset gradient and its MSE initialisation against a plain min-max range."""

import math

import pytest
import torch

from quantcore.algorithms.lsq import LSQPlusQuantizer, LSQQuantizer


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread hand-offs cost more than they save


def away_from_kinks(v, s, Q_N, Q_P, margin=0.05):
    """v nudged so that v/s is neither near a rounding tie (k + ½) nor near a clip edge: the
    gradients are piecewise and a test at a kink would compare one side with the other."""
    r = v / s
    frac = r - torch.floor(r)
    r = torch.where((frac - 0.5).abs() < margin, r + 2 * margin, r)
    for edge in (-Q_N, Q_P):
        r = torch.where((r - edge).abs() < margin, r + 3 * margin, r)
    return r * s


def per_element_grad(out, param):
    """∂out_i/∂param for every element i (one backward pass per element)."""
    flat = out.reshape(-1)
    return torch.stack([torch.autograd.grad(flat[i], param, retain_graph=True)[0] for i in range(flat.numel())])


def grids(bits):
    return {True: (2 ** (bits - 1), 2 ** (bits - 1) - 1), False: (0, 2**bits - 1)}  # signed: (Q_N, Q_P)


# --- LSQ ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_follows_the_sign_of_the_first_tensor(bits):
    signed_q, unsigned_q = LSQQuantizer(bits), LSQQuantizer(bits)
    signed_q(torch.randn(50))
    unsigned_q(torch.rand(50))
    assert signed_q.signed is True and (signed_q.Q_N, signed_q.Q_P) == grids(bits)[True]
    assert unsigned_q.signed is False and (unsigned_q.Q_N, unsigned_q.Q_P) == grids(bits)[False]
    # the grid is fixed by the first tensor: later negative values clip at 0
    out = unsigned_q(-torch.rand(10) - 0.1)
    assert torch.equal(out, torch.zeros(10))


@pytest.mark.parametrize("signed", [True, False])
def test_initial_step_is_twice_the_mean_magnitude_over_root_qp(signed):
    torch.manual_seed(0)
    v = torch.randn(300) * 0.7 + (0.0 if signed else 5.0)
    q = LSQQuantizer(4)
    q(v)
    Q_P = 7 if signed else 15
    assert q.signed is signed
    expected = 2 * sum(abs(float(a)) for a in v) / len(v) / math.sqrt(Q_P)
    assert float(q.s.detach()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True), (8, False)])
def test_forward_is_round_of_clamp_times_s(bits, signed):
    torch.manual_seed(bits)
    Q_N, Q_P = grids(bits)[signed]
    q = LSQQuantizer(bits, signed=signed)
    q.initialized.fill_(True)
    s = 0.13
    q.s.data.fill_(s)
    v = torch.randn(400) * s * (Q_P + 3)  # a good share of the values beyond the range
    out = q(v)
    expected = [round(min(max(float(a) / s, -Q_N), Q_P)) * s for a in v]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)
    levels = (out / s).round()
    assert levels.min() >= -Q_N and levels.max() <= Q_P
    assert levels.unique().numel() <= 2**bits


def _eq3(v, s, Q_N, Q_P):
    """LSQ eq. 3, element by element, in float64."""
    out = []
    for r in (v.double() / s).tolist():
        if r <= -Q_N:
            out.append(-Q_N)
        elif r >= Q_P:
            out.append(Q_P)
        else:
            out.append(-r + round(r))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("bits,signed", [(2, True), (3, True), (4, False), (8, True)])
def test_step_gradient_is_eq3_times_g_for_a_weight(bits, signed):
    torch.manual_seed(10 + bits)
    Q_N, Q_P = grids(bits)[signed]
    s = 0.05
    q = LSQQuantizer(bits, signed=signed)
    q.initialized.fill_(True)
    q.s.data.fill_(s)
    v = torch.randn(6, 7) * s * Q_P * 0.8  # some inside, some clipped
    if not signed:
        v = v.abs()
    v = away_from_kinks(v, s, Q_N, Q_P)
    grad = per_element_grad(q(v), q.s).double()
    g = 1 / math.sqrt(v.numel() * Q_P)  # N = the weight's elements
    expected = _eq3(v.reshape(-1), s, Q_N, Q_P) * g
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)
    # both branches exercised
    r = (v / s).reshape(-1)
    assert bool((r >= Q_P).any()) and bool(((r > -Q_N) & (r < Q_P)).any())


def test_step_gradient_of_an_activation_scales_by_one_samples_features():
    torch.manual_seed(3)
    bits, s = 4, 0.2
    Q_N, Q_P = grids(bits)[False]
    q = LSQQuantizer(bits, signed=False)
    q.activation = True
    q.initialized.fill_(True)
    q.s.data.fill_(s)
    x = away_from_kinks(torch.rand(4, 3, 2, 2) * s * Q_P * 1.3, s, Q_N, Q_P)
    grad = per_element_grad(q(x), q.s).double()
    g = 1 / math.sqrt(3 * 2 * 2 * Q_P)  # features of one sample, not the batch's numel
    assert torch.allclose(grad, _eq3(x.reshape(-1), s, Q_N, Q_P) * g, rtol=1e-4, atol=1e-7)
    # the same tensor seen as a weight: N is every element
    q.activation = False
    grad_w = per_element_grad(q(x), q.s).double()
    assert torch.allclose(grad_w, grad / 2, rtol=1e-4, atol=1e-8)  # √(48/12) = 2


@pytest.mark.parametrize("bits,signed", [(2, True), (3, False), (4, True)])
def test_step_gradient_matches_finite_differences_of_the_frozen_rounding_surrogate(bits, signed):
    """q(s) = s·(clamp(v/s, −Q_N, Q_P) + δ), δ = ⌊clamp(v/s₀)⌉ − clamp(v/s₀) frozen: its value at s₀
    is v̂, its derivative is what the STE makes of ∂v̂/∂s. (δ goes outside the clamp: inside,
    s·clamp(v/s + δ) has a kink at s₀ for every v that rounds onto an edge level.)"""
    torch.manual_seed(20 + bits)
    Q_N, Q_P = grids(bits)[signed]
    s0 = 0.07
    v = torch.randn(40, dtype=torch.float64) * s0 * Q_P
    if not signed:
        v = v.abs()
    v = away_from_kinks(v, s0, Q_N, Q_P)
    q = LSQQuantizer(bits, signed=signed).double()
    q.initialized.fill_(True)
    q.s.data.fill_(s0)
    out = q(v)
    grad = per_element_grad(out, q.s)

    delta = torch.round(torch.clamp(v / s0, -Q_N, Q_P)) - torch.clamp(v / s0, -Q_N, Q_P)

    def surrogate(s):
        return s * (torch.clamp(v / s, -Q_N, Q_P) + delta)

    assert torch.allclose(surrogate(s0), out.detach(), atol=1e-12)  # it is v̂ at s₀
    h = 1e-6
    fd = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    g = 1 / math.sqrt(v.numel() * Q_P)
    assert torch.allclose(grad, fd * g, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("signed", [True, False])
def test_input_gradient_is_one_inside_and_zero_outside(signed):
    torch.manual_seed(5)
    bits, s = 3, 0.1
    Q_N, Q_P = grids(bits)[signed]
    q = LSQQuantizer(bits, signed=signed)
    q.initialized.fill_(True)
    q.s.data.fill_(s)
    v = away_from_kinks(torch.randn(200) * s * Q_P, s, Q_N, Q_P).requires_grad_()
    q(v).sum().backward()
    r = v.detach() / s
    inside = (r > -Q_N) & (r < Q_P)
    assert torch.equal(v.grad, inside.float())
    assert 0 < int(inside.sum()) < 200


# --- LSQ+ -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,signed", [(2, False), (4, False), (3, True), (8, False)])
def test_lsq_plus_forward_is_shifted_lsq(bits, signed):
    torch.manual_seed(bits)
    Q_N, Q_P = grids(bits)[signed]
    q = LSQPlusQuantizer(bits, signed=signed)
    q.initialized.fill_(True)
    s, beta = 0.11, -0.37
    q.s.data.fill_(s)
    q.beta.data.fill_(beta)
    v = torch.randn(400) * s * (Q_P + Q_N + 4) / 2 + beta
    out = q(v)
    expected = [round(min(max((float(a) - beta) / s, -Q_N), Q_P)) * s + beta for a in v]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)
    assert ((out - beta) / s).round().unique().numel() <= 2**bits


def test_lsq_plus_defaults_to_an_unsigned_grid_even_on_signed_data():
    q = LSQPlusQuantizer(3)
    out = q(torch.randn(500))
    assert q.signed is False and (q.Q_N, q.Q_P) == (0, 7)
    assert out.unique().numel() <= 8


@pytest.mark.parametrize("bits,signed", [(3, False), (4, True)])
def test_lsq_plus_gradients_wrt_offset_and_step(bits, signed):
    """∂v̂/∂β: s·(−1/s) + 1 = 0 inside, 1 outside; ∂v̂/∂s: eq. 3 on (v − β)/s; both times g."""
    torch.manual_seed(30 + bits)
    Q_N, Q_P = grids(bits)[signed]
    s, beta = 0.09, 0.25
    q = LSQPlusQuantizer(bits, signed=signed)
    q.initialized.fill_(True)
    q.s.data.fill_(s)
    q.beta.data.fill_(beta)
    v = beta + away_from_kinks(torch.randn(5, 8) * s * (Q_P + Q_N) * 0.6, s, Q_N, Q_P)
    out = q(v)
    g = 1 / math.sqrt(v.numel() * Q_P)
    r = ((v - beta) / s).reshape(-1)
    outside = ((r <= -Q_N) | (r >= Q_P)).double()
    grad_beta = per_element_grad(out, q.beta).double()
    assert torch.allclose(grad_beta, outside * g, atol=1e-7)
    grad_s = per_element_grad(out, q.s).double()
    assert torch.allclose(grad_s, _eq3((v - beta).reshape(-1), s, Q_N, Q_P) * g, rtol=1e-4, atol=1e-7)
    assert 0 < int(outside.sum()) < v.numel()


def _minmax_mse(v, bits):
    """A plain min-max range [min v, max v] on the unsigned grid, by hand."""
    lo, hi = float(v.min()), float(v.max())
    s = (hi - lo) / (2**bits - 1)
    q = torch.round(torch.clamp((v - lo) / s, 0, 2**bits - 1)) * s + lo
    return float((q - v).pow(2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kind", ["exponential", "gelu"])
def test_lsq_plus_mse_initialisation_beats_min_max_on_skewed_data(bits, kind):
    torch.manual_seed(bits)
    if kind == "exponential":
        v = torch.empty(4000).exponential_(1.0) - 0.3
    else:
        v = torch.nn.functional.gelu(torch.randn(4000) * 2)
    q = LSQPlusQuantizer(bits)
    with torch.no_grad():
        out = q(v)
    mse = float((out - v).pow(2).mean())
    reference = _minmax_mse(v, bits)
    assert mse <= reference * (1 + 1e-6)
    if kind == "exponential":  # a long tail: clipping it must pay
        assert mse < 0.9 * reference
    # the offset starts at the range's low end (Q_N = 0 on the unsigned grid)
    assert float(q.beta.detach()) >= float(v.min()) - 1e-6
