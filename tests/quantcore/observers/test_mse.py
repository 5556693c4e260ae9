"""MSE observer: its chosen clip is the brute-force best over the same grid of ratios."""

import numpy as np
import pytest
import torch

from quantcore.observers import MSEObserver
from quantcore.qparams import fake_quant, qparams_from_range
from quantcore.schemes import QuantScheme


def brute_force_ratio(xs, scheme, ratios):
    """For each group, the first ratio p of least Σ (x − fake_quant(x))² with range p·[min, max]."""
    x = torch.cat(xs, dim=-1) if len(xs) > 1 else xs[0]  # updates of (C, k) pooled per channel
    rows = x.numpy().reshape(x.shape[0], -1, scheme.group_size or x.shape[1])  # (C, groups, n)
    lo = np.minimum(rows.min(-1, keepdims=True), 0)
    hi = np.maximum(rows.max(-1, keepdims=True), 0)
    s_shape = (x.shape[0], 1) if scheme.group_size is None else lo.shape  # S: (C, 1) or (C, groups, 1)
    errs = []
    for p in ratios:
        a, b = torch.from_numpy(p * lo).reshape(s_shape), torch.from_numpy(p * hi).reshape(s_shape)
        qp = qparams_from_range(a, b, scheme)
        xhat = fake_quant(torch.from_numpy(rows.reshape(x.shape[0], -1)), qp).numpy().reshape(rows.shape)
        errs.append(((xhat.astype(np.float64) - rows) ** 2).sum(-1))
    best = np.argmin(np.stack(errs), axis=0)  # first minimum: the widest range wins ties
    return np.asarray(ratios)[best], lo[..., 0], hi[..., 0]


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group_size", [("channel", None), ("group", 16)])
def test_clip_is_brute_force_best(bits, symmetric, granularity, group_size):
    scheme = QuantScheme(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(8, 64, generator=g)
    x[:, 0] *= 6  # an outlier in some groups makes clipping worth it
    obs = MSEObserver(scheme, grid=100)
    obs.update(x)
    p, lo, hi = brute_force_ratio([x], scheme, obs.ratios())
    got_lo, got_hi = obs.range()
    np.testing.assert_allclose(got_lo.numpy().reshape(lo.shape), p * lo, rtol=1e-6)
    np.testing.assert_allclose(got_hi.numpy().reshape(hi.shape), p * hi, rtol=1e-6)
    if bits < 8:  # at 8 bits on 64 values clipping rarely pays; below, the test must exercise it
        assert (p < 1).any()


def test_ratios_are_gptq_grid():
    obs = MSEObserver(QuantScheme(bits=4), grid=100, maxshrink=0.8)
    r = obs.ratios()
    assert len(r) == 80 and r[0] == 1 and abs(r[-1] - 0.21) < 1e-12


def test_accumulates_updates_like_concatenated_data():
    scheme = QuantScheme(bits=4, symmetric=False, granularity="channel")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, 40, generator=g) + i for i in range(3)]
    obs = MSEObserver(scheme)
    for x in xs:
        obs.update(x)
    p, lo, hi = brute_force_ratio(xs, scheme, obs.ratios())
    np.testing.assert_allclose(obs.range()[0].numpy().reshape(lo.shape), p * lo, rtol=1e-6)
    np.testing.assert_allclose(obs.range()[1].numpy().reshape(hi.shape), p * hi, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8(fmt):
    scheme = QuantScheme(type=fmt, granularity="channel")
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    obs = MSEObserver(scheme)
    obs.update(x)
    p, _, hi = brute_force_ratio([x], scheme, obs.ratios())  # fp8 is symmetric: hi says it all
    np.testing.assert_allclose(obs.range()[1].numpy().reshape(hi.shape), p * hi, rtol=1e-6)
    qp = obs.qparams()
    err_mse = (fake_quant(x, qp) - x).pow(2).sum()
    err_minmax = (fake_quant(x, qparams_from_range(x.amin(1, True), x.amax(1, True), scheme)) - x).pow(2).sum()
    assert err_mse <= err_minmax
