"""N2UQ against independent references: threshold counts and uniform rounding in numpy, the
G-STE slopes worked out by hand, finite differences of the piecewise-linear surrogate built
with np.interp, the released code's weight formula re-derived in numpy, and a tiny training
run."""

import numpy as np
import pytest
import torch
from torch import nn

from quantcore.algorithms.n2uq import N2UQQuantizer, N2UQWeightQuantizer


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread hand-offs cost more than they save


def set_params(q, start, a, s):
    with torch.no_grad():
        q.start.fill_(start)
        q.a.copy_(torch.as_tensor(a, dtype=q.a.dtype))
        q.s.fill_(s)
    q.initialized.fill_(True)


def ref_thresholds(start, a):
    """T_i = d_{i-1} + a_i/2 with d_0 = start, d_i = d_0 + a_1 + ... + a_i."""
    d = start + np.concatenate([[0.0], np.cumsum(a)])
    return d[:-1] + np.asarray(a) / 2, d


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_forward_is_a_threshold_count_on_the_uniform_grid_and_monotone(bits):
    g = torch.Generator().manual_seed(bits)
    n = 2**bits - 1
    q = N2UQQuantizer(bits, signed=False)
    a = (torch.rand(n, generator=g) * 0.5 + 0.05).numpy()  # non-uniform intervals
    set_params(q, 0.1, a, 0.25)
    x = torch.randn(2000, generator=g).abs() * 2
    y = q(x).detach().numpy()
    levels = y / 0.25
    assert np.allclose(levels, np.round(levels), atol=1e-5)
    assert levels.min() >= 0 and levels.max() <= n
    T, _ = ref_thresholds(0.1, a)
    expected = (x.numpy()[:, None] >= T[None, :]).sum(1)
    assert np.array_equal(np.round(levels).astype(int), expected)
    order = np.argsort(x.numpy())
    assert np.all(np.diff(y[order]) >= 0)


@pytest.mark.parametrize("signed", [False, True])
def test_initial_quantizer_is_uniform_rounding_over_the_first_batch(signed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, generator=g)
    x = x if signed else torch.relu(x)
    q = N2UQQuantizer(3)
    y = q(x).detach().numpy()
    assert q.signed is signed
    lo, hi = (-4, 3) if signed else (0, 7)
    xn = x.numpy()
    s = max(-xn.min() / 4, xn.max() / 3) if signed else xn.max() / 7
    reference = np.clip(np.round(xn / s), lo, hi) * s
    assert abs(q.s.item() - s) < 1e-6 * s
    assert np.allclose(y, reference, atol=1e-5)
    assert np.all(np.diff(q.thresholds().detach().numpy()) > 0)


def test_gste_backward_is_the_slope_one_over_a_i_by_hand():
    q = N2UQQuantizer(2, signed=False)
    set_params(q, 0.0, [0.5, 1.0, 2.0], 0.5)  # d = 0, 0.5, 1.5, 3.5; T = 0.25, 1.0, 2.5
    x = torch.tensor([-0.5, 0.0, 0.2, 0.7, 2.0, 3.0, 4.0], requires_grad=True)
    y = q(x)
    assert torch.allclose(y.detach(), 0.5 * torch.tensor([0.0, 0, 0, 1, 2, 3, 3]))
    y.sum().backward()
    s = 0.5
    expected = [0.0, 0.0, s / 0.5, s / 1.0, s / 2.0, s / 2.0, 0.0]  # slope s/a_i in interval i, 0 outside
    assert torch.allclose(x.grad, torch.tensor(expected))


@pytest.mark.parametrize("bits,signed", [(2, False), (3, True)])
def test_threshold_gradients_match_finite_differences_of_the_surrogate(bits, signed):
    g = torch.Generator().manual_seed(7)
    n = 2**bits - 1
    qmin = -(2 ** (bits - 1)) if signed else 0
    q = N2UQQuantizer(bits, signed=signed).double()
    a = (torch.rand(n, generator=g, dtype=torch.float64) * 0.4 + 0.2).numpy()
    start, s = -0.3, 0.7
    set_params(q, start, a, s)
    _, d = ref_thresholds(start, a)
    x = torch.linspace(d[0] - 0.5, d[-1] + 0.5, 157, dtype=torch.float64)
    x = x[(np.abs(x.numpy()[:, None] - d[None, :]) > 1e-3).all(1)]  # keep off the kinks
    up = torch.randn(len(x), generator=g, dtype=torch.float64)
    (q(x) * up).sum().backward()

    xn, un = x.numpy(), up.numpy()

    def surrogate_loss(start, a, s):  # Σ g · s (l + F(x)), F through the points (d_i, i)
        d = start + np.concatenate([[0.0], np.cumsum(a)])
        return float((un * s * (qmin + np.interp(xn, d, np.arange(n + 1)))).sum())

    h = 1e-6
    fd_start = (surrogate_loss(start + h, a, s) - surrogate_loss(start - h, a, s)) / (2 * h)
    fd_a = []
    for k in range(n):
        e = np.zeros(n)
        e[k] = h
        fd_a.append((surrogate_loss(start, a + e, s) - surrogate_loss(start, a - e, s)) / (2 * h))
    assert q.start.grad.item() == pytest.approx(fd_start, rel=1e-5, abs=1e-7)
    assert np.allclose(q.a.grad.numpy(), fd_a, rtol=1e-5, atol=1e-7)
    T, _ = ref_thresholds(start, a)
    forward_levels = qmin + (xn[:, None] >= T[None, :]).sum(1)
    assert q.s.grad.item() == pytest.approx(float((un * forward_levels).sum()), rel=1e-9)


def test_thresholds_stay_ordered_when_training_squeezes_them():
    g = torch.Generator().manual_seed(3)
    q = N2UQQuantizer(3)
    x = torch.relu(torch.randn(512, generator=g))
    q(x)
    optimizer = torch.optim.SGD(q.parameters(), lr=0.5)
    for _ in range(100):  # −Σ y pulls every a_i down (∂y/∂a_k = −s/a_i ≤ 0)
        optimizer.zero_grad()
        (-q(x).sum() / len(x)).backward()
        optimizer.step()
    assert (q.a < q.eps).any()  # some raw a_i went below the floor ...
    T = q.thresholds().detach()
    assert torch.all(T[1:] > T[:-1])  # ... the thresholds are still strictly increasing
    assert torch.all(q.interval_lengths() >= q.eps)


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError):
        N2UQQuantizer(2, min_interval=0.0)
    with pytest.raises(ValueError):
        N2UQQuantizer(2, threshold_init="quantile")
    with pytest.raises(ValueError):
        N2UQQuantizer(1)
    with pytest.raises(ValueError):
        N2UQWeightQuantizer(2, signed=False)
    with pytest.raises(ValueError):
        N2UQWeightQuantizer(2, per_channel="sometimes")


@pytest.mark.parametrize("bits,per_channel", [(2, True), (3, False)])
def test_weight_quantizer_matches_the_released_formula(bits, per_channel):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(8, 16, 3, 3, generator=g) * 0.1
    W.requires_grad_(True)
    out = N2UQWeightQuantizer(bits, per_channel=per_channel)(W)
    Wn = W.detach().numpy()
    gamma = (2**bits - 1) / 2 ** (bits - 1)
    mean_abs = np.abs(Wn).mean(axis=(1, 2, 3), keepdims=True) if per_channel else np.abs(Wn).mean()
    alpha = gamma * mean_abs
    n = (2**bits - 1) / 2  # round((w/α + 1)·n)/n − 1 on [−1, 1]
    reference = alpha * (np.round((np.clip(Wn / alpha, -1, 1) + 1) * n) / n - 1)
    assert np.allclose(out.detach().numpy(), reference, atol=1e-6)
    per_row = out.detach().reshape(8, -1) if per_channel else out.detach().reshape(1, -1)
    assert all(len(torch.unique(r)) <= 2**bits for r in per_row)  # exactly, not up to rounding
    out.sum().backward()
    assert torch.equal(W.grad, torch.ones_like(W))  # straight-through


def test_tiny_training_run_reduces_the_loss_and_learns_nonuniform_thresholds():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 4, generator=g)) @ torch.randn(4, 1, generator=g)
    quantizer = N2UQQuantizer(2)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), quantizer, nn.Linear(32, 1))
    loss_fn = nn.MSELoss()
    with torch.no_grad():
        start = loss_fn(model(x), y).item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = loss_fn(model(x), y).item()
    assert quantizer.signed is False
    assert end < 0.3 * start
    a = quantizer.interval_lengths().detach()
    assert (a.max() - a.min()) / a.mean() > 0.05  # the thresholds moved apart unevenly
