"""EWGS against references written out here: LSQ's rounding forward, the paper's gradient
rule g_{x_n} = g_{x_q}(1 + δ sign(g_{x_q})(x_n − x_q)) (x_n − x_q in the paper's [0, 1] units)
computed by hand, the STE when δ = 0, the Hessian rule δ = (Tr H / N) / 3σ(g) on a loss whose
Hessian is known in closed form, and a small training run."""

import math

import pytest
import torch
from torch import nn

from quantcore.algorithms.ewgs import EWGSQuantizer, update_hessian_deltas
from quantcore.algorithms.quantsim import QuantSimLayer

BITS = 3
Q_N, Q_P = 4, 3  # signed 3-bit grid
L = Q_N + Q_P  # 2^b − 1: the paper's normalization


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: thread hand-offs cost more than they save


def prepared(delta, s=0.25, bits=BITS, signed=True):
    q = EWGSQuantizer(bits, signed=signed, delta=delta)
    q(torch.zeros(1) + 1.0)  # initialize, then set the step by hand
    q.s.data.fill_(s)
    return q


def by_hand(x, G, s, delta, numel_for_g):
    """v̂, ∂L/∂v and ∂L/∂s for L = Σ G·v̂, from the paper's rule and LSQ's grid."""
    v = x / s
    x_n = v.clamp(-Q_N, Q_P)
    x_q = torch.round(x_n)
    inside = (v > -Q_N) & (v < Q_P)
    factor = 1 + delta * torch.sign(G) * (x_n - x_q) / L  # sign(g_{x_q}) = sign(G·s) = sign(G)
    grad_x = torch.where(inside, G * factor, torch.zeros_like(G))
    # v̂ = x_q(x/s)·s: ∂v̂/∂s = x_q + s·factor·∂x_n/∂s, ∂x_n/∂s = −x/s² inside, 0 outside
    d_s = torch.where(inside, x_q - factor * v, x_q)
    g_scale = 1 / math.sqrt(numel_for_g * Q_P)
    return x_q * s, grad_x, float((G * d_s).sum()) * g_scale


def test_forward_is_lsq_rounding():
    torch.manual_seed(0)
    q = prepared(0.5)
    x = torch.randn(40) * 0.6
    expected = torch.round(torch.clamp(x / 0.25, -Q_N, Q_P)) * 0.25
    assert torch.equal(q(x), expected)


@pytest.mark.parametrize("delta", [0.0, 1e-3, 3.0])
def test_backward_is_the_papers_rule_by_hand(delta):
    torch.manual_seed(1)
    s = 0.25
    q = prepared(delta, s)
    x = (torch.randn(6, 5) * 0.5).requires_grad_()
    G = torch.randn(6, 5)
    (q(x) * G).sum().backward()
    out, grad_x, grad_s = by_hand(x.detach(), G, s, delta, x.numel())
    assert torch.allclose(x.grad, grad_x, atol=1e-6)
    assert float(q.s.grad) == pytest.approx(grad_s, rel=1e-5, abs=1e-7)
    inside = (x.detach() / s > -Q_N) & (x.detach() / s < Q_P)
    assert bool(inside.any()) and bool((~inside).any())  # both branches exercised


def test_delta_zero_is_the_ste():
    torch.manual_seed(2)
    q = prepared(0.0)
    x = (torch.randn(50) * 0.6).requires_grad_()
    G = torch.randn(50)
    (q(x) * G).sum().backward()
    inside = (x.detach() / 0.25 > -Q_N) & (x.detach() / 0.25 < Q_P)
    assert torch.equal(x.grad, torch.where(inside, G, torch.zeros_like(G)))


def test_scaling_direction_matches_the_paper():
    """x_n = 1.3 rounds to 1. A negative gradient (descent raises x_n; 0.2 to go before x_q
    becomes 2) is damped; a positive one (descent lowers x_n; 0.8 to go before x_q becomes 0)
    is enlarged."""
    q = prepared(2.0, s=1.0)
    x = torch.tensor([1.3, 1.3], requires_grad=True)  # x_n − x_q = 0.3
    (q(x) * torch.tensor([-1.0, 1.0])).sum().backward()
    assert x.grad.tolist() == pytest.approx([-(1 - 2.0 * 0.3 / L), 1 + 2.0 * 0.3 / L])


def test_initialize_from_a_weight():
    torch.manual_seed(3)
    W = torch.randn(16, 8) * 0.1
    q = EWGSQuantizer(4, signed=True)
    q(W)
    assert float(q.s.detach()) == pytest.approx(2 * float(W.abs().mean()) / math.sqrt(7), rel=1e-5)
    assert 0 < float(q.s.detach()) < float(W.abs().max())
    assert float(q.delta) == pytest.approx(1e-3)  # the paper's fixed δ by default


@pytest.mark.parametrize("options", [{"delta": -0.1}, {"delta": "auto"}, {"delta": float("nan")}, {"gamma": 1.0}])
def test_bad_options(options):
    with pytest.raises(ValueError):
        EWGSQuantizer(4, **options)


def test_bad_bits():
    with pytest.raises(ValueError):
        EWGSQuantizer(1)


def test_hessian_delta_on_a_known_hessian():
    """loss = ½ Σ a_i (ŵ_i − t_i)², ŵ = x_q·s: in integer units H = diag(a s²) (Hutchinson is
    exact on a diagonal), g = a s (ŵ − t); the paper's δ = L · mean(a s²) / (3 σ(g))."""
    torch.manual_seed(4)
    W = nn.Parameter(torch.randn(64) * 0.3)
    a, t = torch.rand(64) + 0.5, torch.randn(64) * 0.3
    q = EWGSQuantizer(BITS, signed=True, delta="hessian")
    holder = nn.Module()
    holder.q = q
    assert float(q.delta) == 0.0  # the STE until the first estimate

    def loss(_batch):
        return 0.5 * (a * (q(W) - t) ** 2).sum()

    deltas = update_hessian_deltas(holder, loss, batches=[0, 1], probes=3)
    s = float(q.s.detach())
    with torch.no_grad():
        g = a * s * (q(W) - t)
    expected = L * float((a * s * s).mean()) / (3 * float(g.std()))
    assert deltas == {"q": pytest.approx(expected, rel=1e-4)}
    assert float(q.delta) == pytest.approx(expected, rel=1e-4)
    # negative curvature: δ is clipped at 0
    deltas = update_hessian_deltas(holder, lambda _b: -loss(_b), batches=[0], probes=3)
    assert deltas == {"q": 0.0}


def test_hutchinson_on_an_off_diagonal_hessian():
    """loss = ½ x_qᵀ A x_q s² with a dense symmetric A: Tr H = s² Tr A, which Hutchinson's
    estimate approaches with many probes."""
    torch.manual_seed(5)
    W = nn.Parameter(torch.randn(12) * 0.3)
    B = torch.randn(12, 12)
    A = B @ B.T / 12 + torch.eye(12)
    q = EWGSQuantizer(BITS, signed=True, delta="hessian")
    holder = nn.Module()
    holder.q = q

    def loss(_batch):
        w = q(W)
        return 0.5 * w @ A @ w

    delta = update_hessian_deltas(holder, loss, [0], probes=400)["q"]
    s = float(q.s.detach())
    with torch.no_grad():
        g = s * (A @ q(W))
    expected = L * s * s * float(torch.trace(A)) / 12 / (3 * float(g.std()))
    assert delta == pytest.approx(expected, rel=0.1)


def toy_regression(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        y = teacher(x)
    return x, y


def quantized_mlp(make):
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    first = QuantSimLayer(model[0], make(True), make(None))
    second = QuantSimLayer(model[2], make(True), make(None))
    first.input_quantizer.activation = second.input_quantizer.activation = True
    return nn.Sequential(first, nn.ReLU(), second)


@pytest.mark.parametrize("delta", [1e-3, "hessian"])
def test_training_reduces_the_loss(delta):
    x, y = toy_regression()
    torch.manual_seed(1)
    model = quantized_mlp(lambda signed: EWGSQuantizer(4, signed=signed, delta=delta))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    mse = nn.MSELoss()
    with torch.no_grad():
        start = float(mse(model(x), y))
    for step in range(300):
        if delta == "hessian" and step % 100 == 0:
            update_hessian_deltas(model, lambda b: mse(model(b[0]), b[1]), [(x[:64], y[:64])], probes=4)
        optimizer.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = float(mse(model(x), y))
    # about 0.01 here; 0.35 when no gradient passes the rounding (biases and s alone)
    assert end < 0.05 * start, (start, end)
    if delta == "hessian":
        deltas = [float(m.delta) for m in model.modules() if isinstance(m, EWGSQuantizer)]
        assert all(d >= 0 and math.isfinite(d) for d in deltas) and any(d > 0 for d in deltas)
