"""PACT against the paper: clip to [0, α] then a uniform grid of 2^k − 1 steps of α/(2^k − 1)
(eq. 1-2, written out naively), ∂y_q/∂α by central finite differences of clip(x, 0, α)
(eq. 3: 1 where x ≥ α, 0 elsewhere), ∂y_q/∂x = 1 on [0, α), the L2 penalty λα², and α's
start at the first batch's largest value."""

import pytest
import torch

from quantcore.algorithms.pact import PACTQuantizer


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread hand-offs cost more than they save


def naive_pact(values, alpha, bits):
    levels = 2**bits - 1
    step = alpha / levels
    out = []
    for x in values:
        y = min(max(x, 0.0), alpha)
        out.append(round(y / step) * step)
    return out


def generic_points(alpha, n=300, seed=0):
    """Values on both sides of 0 and α, none at the kinks 0 and α, none at a rounding tie."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 1.6 - 0.3) * alpha
    x = x[((x.abs() > 1e-3 * alpha) & ((x - alpha).abs() > 1e-3 * alpha))]
    return x


def make(bits, alpha, dtype=torch.float32, decay=1e-4):
    q = PACTQuantizer(bits, alpha_decay=decay).to(dtype)
    q.initialized.fill_(True)
    q.alpha.data.fill_(alpha)
    return q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_forward_is_clip_then_uniform_rounding(bits):
    alpha = 1.7
    q = make(bits, alpha, torch.float64)
    x = generic_points(alpha, seed=bits)
    out = q(x).detach()
    assert torch.allclose(out, torch.tensor(naive_pact(x.tolist(), alpha, bits), dtype=torch.float64), atol=1e-9)
    levels = out * (2**bits - 1) / alpha
    assert torch.allclose(levels, levels.round(), atol=1e-6)
    assert out.unique().numel() <= 2**bits
    assert float(out.min()) == 0.0 and float(out.max()) == pytest.approx(alpha)


@pytest.mark.parametrize("bits", [2, 4])
def test_alpha_gradient_is_the_finite_difference_of_the_clip(bits):
    alpha = 0.9
    q = make(bits, alpha, torch.float64)
    x = generic_points(alpha, n=200, seed=10 + bits)
    out = q(x)
    grad = torch.stack([torch.autograd.grad(out[i], q.alpha, retain_graph=True)[0] for i in range(len(x))])

    def clip(a):
        return torch.clamp(x, min=0.0).minimum(torch.tensor(a, dtype=torch.float64))

    h = 1e-7
    fd = (clip(alpha + h) - clip(alpha - h)) / (2 * h)
    assert torch.allclose(grad, fd, atol=1e-6)
    assert torch.equal(grad, (x >= alpha).double())  # eq. 3
    assert 0 < int((x >= alpha).sum()) < len(x)


def test_input_gradient_is_one_on_zero_to_alpha():
    alpha = 2.5
    q = make(3, alpha)
    x = generic_points(alpha, seed=4).float().requires_grad_()
    q(x).sum().backward()
    expected = ((x.detach() >= 0) & (x.detach() < alpha)).float()
    assert torch.equal(x.grad, expected)
    assert 0 < int(expected.sum()) < len(x)


def test_rounding_error_reaches_neither_gradient():
    """The STE: the gradients of y_q are those of the unrounded clip for a batch too."""
    alpha = 1.3
    q = make(2, alpha)
    x = generic_points(alpha, seed=7).float().requires_grad_()
    w = torch.randn(len(x))
    (q(x) * w).sum().backward()
    inside = (x.detach() >= 0) & (x.detach() < alpha)
    assert torch.allclose(x.grad, w * inside.float())
    assert float(q.alpha.grad) == pytest.approx(float((w * (x.detach() >= alpha).float()).sum()), rel=1e-5)


@pytest.mark.parametrize("decay", [0.0, 1e-4, 0.05])
def test_penalty_is_lambda_alpha_squared(decay):
    q = make(4, 3.0, decay=decay)
    penalty = q.penalty()
    assert float(penalty.detach()) == pytest.approx(decay * 9.0)
    penalty.backward()
    assert float(q.alpha.grad) == pytest.approx(2 * decay * 3.0)  # ∂(λα²)/∂α


def test_signed_and_negative_decay_are_refused():
    with pytest.raises(ValueError):
        PACTQuantizer(4, signed=True)
    with pytest.raises(ValueError):
        PACTQuantizer(4, alpha_decay=-1.0)
    with pytest.raises(ValueError):
        PACTQuantizer(1)
    assert PACTQuantizer(4, signed=False).signed is False


def test_alpha_starts_at_the_first_batch_max_and_stays():
    torch.manual_seed(0)
    first = torch.relu(torch.randn(8, 4, 5, 5)) * 3
    q = PACTQuantizer(4)
    out = q(first)
    assert float(q.alpha.detach()) == pytest.approx(float(first.max()))
    assert bool(q.initialized) and q.signed is False
    # no clipping of the first batch: its max maps to the top level
    assert float(out.detach().max()) == pytest.approx(float(first.max()))
    q(first * 10)  # a later batch does not re-initialise
    assert float(q.alpha.detach()) == pytest.approx(float(first.max()))
