"""GPTQ's math against independent references: RTN when there is no error to propagate,
a lower layer-output error than RTN on correlated inputs, codes on the returned grid, and
lazy batching as an exact reorganisation of the column loop."""

import pytest
import torch
from torch import nn

from quantcore.algorithms.gptq import GPTQ
from quantcore.modules import QuantizedLinear
from quantcore.qparams import calculate_qparams, fake_quant
from quantcore.schemes import QuantScheme


def scheme(bits=4, symmetric=True, group=None):
    return QuantScheme(bits=bits, symmetric=symmetric, granularity="group" if group else "channel", group_size=group)


def correlated_inputs(n=512, columns=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) / columns**0.5
    return (torch.randn(n, columns, generator=g) @ mixing) * torch.linspace(0.2, 3, columns)


def solve(X, W, s, **kw):
    gptq = GPTQ(W.shape[1])
    for chunk in X.split(128):
        gptq.add_batch(chunk)
    return gptq.quantize(W, s, scale_dtype=torch.float32, **kw)


def test_identity_hessian_gives_rtn():
    """With H ∝ I no column's error can be compensated by another: GPTQ is RTN."""
    W = torch.randn(16, 32)
    s = scheme(4, group=8)
    gptq = GPTQ(32)
    gptq.H = torch.eye(32)
    gptq.nsamples = 1
    result = gptq.quantize(W, s, damp=0.01, scale_dtype=torch.float32)
    torch.testing.assert_close(result.Q, fake_quant(W, calculate_qparams(W, s)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,symmetric,group,act_order", [(3, True, None, False), (4, False, 16, False), (4, True, 16, True), (3, False, None, True)])
def test_beats_rtn_on_layer_output_and_stays_on_grid(bits, symmetric, group, act_order):
    X = correlated_inputs()
    W = torch.randn(48, 64)
    s = scheme(bits, symmetric, group)
    result = solve(X, W, s, act_order=act_order)
    rtn = fake_quant(W, calculate_qparams(W, s))
    err_gptq = (X @ (W - result.Q).T).pow(2).sum()
    err_rtn = (X @ (W - rtn).T).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    torch.testing.assert_close(fake_quant(result.Q, result.qparams), result.Q, rtol=0, atol=1e-6)
    linear = nn.Linear(64, 48, bias=False)
    q = QuantizedLinear.from_float(linear, s, qparams=result.qparams, weight=result.Q, scale_dtype=torch.float32)
    torch.testing.assert_close(q.dequantize_weight(), result.Q, rtol=0, atol=1e-6)


def test_lazy_batches_are_exact():
    X, W, s = correlated_inputs(), torch.randn(32, 64), scheme(4, group=16)
    one = solve(X, W, s, block_size=1).Q
    many = solve(X, W, s, block_size=64).Q
    odd = solve(X, W, s, block_size=24).Q  # blocks that split groups
    torch.testing.assert_close(many, one, rtol=0, atol=1e-5)
    torch.testing.assert_close(odd, one, rtol=0, atol=1e-5)


def test_dead_inputs():
    X = correlated_inputs()
    X[:, 5] = 0
    result = solve(X, torch.randn(8, 64), scheme(4))
    assert torch.all(result.Q[:, 5] == 0) and torch.isfinite(result.Q).all()


@pytest.mark.parametrize("columns", [5, 192, 200, 600])
def test_hessian_is_twice_the_mean_outer_product(columns):
    """H = 2/n Σ x xᵀ, against a float64 sum of outer products, however the inputs arrive
    (batches of any size, blocks of the Gram matrix computed once)."""
    X = correlated_inputs(n=300, columns=columns, seed=1) if columns <= 64 else torch.randn(300, columns) * torch.rand(columns)
    gptq = GPTQ(columns)
    for chunk in X.split(37):
        gptq.add_batch(chunk.reshape(1, -1, columns))
    X64 = X.double()
    expected = 2 / X.shape[0] * sum(torch.outer(x, x) for x in X64)
    torch.testing.assert_close(gptq.H.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert torch.equal(gptq.H, gptq.H.T)


def test_hessian_of_bfloat16_inputs_is_their_exact_gram_matrix():
    """Calibration forwards in bfloat16 feed bf16 inputs. H must be 2/n XᵀX of those values as
    float64 computes it (a bf16 product rounds each entry to 8 bits and leaves negative
    eigenvalues the dampening cannot cover: the Cholesky then fails at random)."""
    X = (correlated_inputs(n=512, columns=96) * torch.linspace(0.1, 20, 96)).to(torch.bfloat16)
    gptq = GPTQ(96)
    for chunk in X.split(100):
        gptq.add_batch(chunk)
    exact = (X.double().T @ X.double()) * (2 / 512)
    torch.testing.assert_close(gptq.H.double(), exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))
    assert float(torch.linalg.eigvalsh(gptq.H.double()).min()) > -1e-6 * float(exact.abs().max())
