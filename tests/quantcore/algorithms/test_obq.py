"""OBQ against independent references: a brute-force search over every code assignment of a
tiny layer, a naive greedy that re-inverts the Hessian of the remaining weights at every
step, and its role as GPTQ's oracle (OBQ ≤ GPTQ < RTN in layer-output error)."""

import itertools

import pytest
import torch

from quantcore import quantize
from quantcore.algorithms.gptq import GPTQ
from quantcore.algorithms.obq import OBQ
from quantcore.observers import make_observer
from quantcore.qparams import fake_quant, qparams_from_range
from quantcore.schemes import QuantScheme


def correlated_inputs(n, columns, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=g) / columns**0.5 + torch.eye(columns)
    return torch.randn(n, columns, generator=g) @ mix


def output_error(X, W, Q):
    return float((X @ (W - Q).T).pow(2).sum())


def solver(cls, X):
    s = cls(X.shape[1])
    s.add_batch(X)
    return s


def rtn(W, scheme):
    o = make_observer(scheme)
    o.update(W)
    return fake_quant(W, qparams_from_range(*o.range(), scheme, torch.float16))


def naive_obq(W, H, scheme, damp=0.01):
    """The greedy written out: re-invert the Hessian of the weights left at every step."""
    H = H.double() + damp * torch.mean(torch.diag(H.double())) * torch.eye(H.shape[0], dtype=torch.float64)
    o = make_observer(scheme)
    o.update(W)
    qp = qparams_from_range(*o.range(), scheme, torch.float16)
    out, orders = W.clone().double(), []
    for r in range(W.shape[0]):
        w, left, order = out[r].clone(), list(range(W.shape[1])), []
        s, z = float(qp.scale.reshape(-1)[r]), float(qp.zero_point.reshape(-1)[r])
        quant = lambda v: (min(max(round(v / s) + z, scheme.qmin), scheme.qmax) - z) * s  # noqa: E731
        while left:
            Hinv = torch.linalg.inv(H[left][:, left])
            costs = [(quant(float(w[j])) - float(w[j])) ** 2 / float(Hinv[k, k]) for k, j in enumerate(left)]
            k = min(range(len(left)), key=costs.__getitem__)
            beyond = [abs(quant(float(w[j])) - float(w[j])) - s / 2 for j in left]  # outliers go first
            if max(beyond) > 0:
                k = max(range(len(left)), key=beyond.__getitem__)
            p = left[k]
            q = quant(float(w[p]))
            delta = (float(w[p]) - q) / float(Hinv[k, k])
            for i, j in enumerate(left):
                w[j] -= delta * float(Hinv[i, k])
            w[p] = q
            left.remove(p)
            order.append(p)
        out[r] = w
        orders.append(order)
    return out.float(), orders


def test_tiny_layer_against_brute_force_and_the_naive_greedy():
    torch.manual_seed(0)
    X = correlated_inputs(64, 5)
    W = torch.randn(3, 5)
    scheme = QuantScheme(bits=2, granularity="channel")
    result = solver(OBQ, X).quantize(W, scheme)
    H = 2 * X.T @ X / X.shape[0]
    naive, _ = naive_obq(W, H, scheme)
    torch.testing.assert_close(result.Q, naive, rtol=1e-4, atol=1e-5)  # same choices, same codes
    o = make_observer(scheme)
    o.update(W)
    qp = qparams_from_range(*o.range(), scheme, torch.float16)
    for r in range(3):
        s = float(qp.scale.reshape(-1)[r])
        levels = [(c * s) for c in range(scheme.qmin, scheme.qmax + 1)]
        best = min(output_error(X, W[r : r + 1], torch.tensor([codes])) for codes in itertools.product(levels, repeat=5))
        ours = output_error(X, W[r : r + 1], result.Q[r : r + 1])
        assert best - 1e-6 <= ours <= output_error(X, W[r : r + 1], rtn(W, scheme)[r : r + 1]) + 1e-6


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_obq_is_the_oracle_gptq_approaches(bits, granularity):
    torch.manual_seed(bits)
    X = correlated_inputs(512, 64, seed=bits)
    W = torch.randn(32, 64) * 0.1
    scheme = QuantScheme(bits=bits, granularity=granularity, group_size=16 if granularity == "group" else None)
    errors = {
        "obq": output_error(X, W, solver(OBQ, X).quantize(W, scheme).Q),
        "gptq": output_error(X, W, solver(GPTQ, X).quantize(W, scheme, static_groups=True).Q),
        "rtn": output_error(X, W, rtn(W, scheme)),
    }
    assert errors["obq"] <= errors["gptq"] * 1.05, errors
    assert errors["gptq"] < errors["rtn"], errors


def test_uncorrelated_inputs_leave_nothing_to_compensate():
    torch.manual_seed(3)
    W = torch.randn(8, 16)
    scheme = QuantScheme(bits=3, granularity="channel")
    obq = OBQ(16)
    obq.H = torch.eye(16)
    torch.testing.assert_close(obq.quantize(W, scheme).Q, rtn(W, scheme))


def test_oversized_layers_are_refused_and_the_stage_runs():
    with pytest.raises(ValueError, match="use gptq"):
        OBQ(2048).quantize(torch.randn(4096, 2048), QuantScheme(bits=4, granularity="channel"))
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    results = quantize(model, {"stages": [{"algorithm": "obq", "ignore": [], "weights": {"bits": 4}}]},
                       calibration=[torch.randn(32, 16) for _ in range(4)], compute_dtype="float32")
    assert [r["name"] for r in results] == ["0", "2"] and all("obq_loss" in r for r in results)
