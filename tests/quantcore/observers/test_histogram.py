"""Histogram observer: its chosen range against the true fake-quant MSE, measured directly."""

import numpy as np
import pytest
import torch

from quantcore.observers import HistogramObserver, histogram
from quantcore.qparams import fake_quant, qparams_from_range
from quantcore.schemes import QuantScheme


def true_mse(x: torch.Tensor, lo, hi, scheme: QuantScheme) -> torch.Tensor:
    """mean (x − fake_quant(x))² of a 1-D x for each candidate range [lo[i], hi[i]], measured."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float32).reshape(-1), torch.as_tensor(hi, dtype=torch.float32).reshape(-1)
    rows = QuantScheme(type=scheme.type, bits=scheme.bits, symmetric=scheme.symmetric, granularity="channel")
    out = []
    for a, b in zip(lo.split(128), hi.split(128)):
        X = x.expand(len(a), -1)
        out.append((fake_quant(X, qparams_from_range(a[:, None], b[:, None], rows)) - X).pow(2).mean(-1))
    return torch.cat(out)


def gaussian_with_outliers(n, outlier, seed=0):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x[0], x[1] = outlier, -outlier
    return x


def observe(x, scheme, **kw):
    obs = HistogramObserver(scheme, **kw)
    obs.update(x)
    lo, hi = obs.range()
    return obs, lo.item(), hi.item()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_outliers_are_clipped_and_error_drops(bits, symmetric):
    # two outliers in 2^20 values: rarer than 1 / (12 · 127²), so clipping them pays even at 8 bits
    x = gaussian_with_outliers(1 << 20, 40.0)
    scheme = QuantScheme(bits=bits, symmetric=symmetric, granularity="tensor")
    _, lo, hi = observe(x, scheme)
    assert hi - lo < 0.5 * (x.max() - x.min()).item()
    mse_hist = true_mse(x, lo, hi, scheme).item()
    mse_minmax = true_mse(x, x.min(), x.max(), scheme).item()
    assert mse_hist < 0.5 * mse_minmax


@pytest.mark.parametrize("bits,keep", [(4, 0.9), (8, 0.99)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_uniform_data_keeps_the_full_range(bits, keep, symmetric):
    # for U(-1, 1) the optimum clips only ≈ 1 / (u·√6) of the range: 6 % at 4 bits, 0.3 % at 8
    x = torch.rand(1 << 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _, lo, hi = observe(x, QuantScheme(bits=bits, symmetric=symmetric, granularity="tensor"))
    assert hi - lo >= keep * 2


# Up to ~5 bits a grid cell spans dozens of bins, so the histogram resolves the data's own
# rounding error and the chosen clip lands where the measured error is least. At 8 bits a cell
# spans ~8 bins: the histogram estimates each value's rounding error (the expectation) while
# the brute force over 1024 clips also finds clips that are lucky for this sample (the error's
# sampling noise is ~0.9/sqrt(n) = 0.7 %), so there only the error is compared, to that level.
@pytest.mark.parametrize(
    "fmt,bits,n,mse_tol,check_clip",
    [
        ("int", 2, 1 << 13, 1e-3, True),
        ("int", 4, 1 << 13, 1e-3, True),
        ("int", 5, 1 << 13, 1e-3, True),
        ("int", 8, 1 << 14, 5e-3, False),
        ("fp8_e4m3", 8, 1 << 14, 5e-3, False),
        ("fp8_e5m2", 8, 1 << 14, 5e-3, False),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_symmetric_clip_matches_brute_force(fmt, bits, n, mse_tol, check_clip, seed):
    x = gaussian_with_outliers(n, 30.0, seed=seed)
    scheme = QuantScheme(type=fmt, bits=bits, symmetric=True, granularity="tensor")
    obs, lo, hi = observe(x, scheme)
    c, bin_width = max(-lo, hi), obs.width.item()
    clips = torch.arange(1, 1025) * (30.0 / 1024)  # one step ≈ one bin
    errs = true_mse(x, -clips, clips, scheme)
    best = errs.min().item()
    assert true_mse(x, -c, c, scheme).item() <= best * (1 + mse_tol)
    if check_clip:
        # … and c lies within a bin of a clip whose true error is the optimum's (the valley is flat)
        near = clips[errs <= best * (1 + 1e-4)]
        assert (near - c).abs().min().item() <= bin_width


# At 8 bits a cell spans only ~8 bins, so the histogram estimates each value's rounding error
# rather than resolving it; a brute force over thousands of ranges on a small sample then finds
# ranges that are lucky for that sample (the sampling noise of the error is ~1/sqrt(n)), so
# 8 bits is measured on 8× more values, with a coarser grid to keep it cheap.
@pytest.mark.parametrize("bits,n,grid", [(3, 1 << 12, (32, 96)), (5, 1 << 12, (32, 96)), (8, 1 << 15, (16, 64))])
def test_asymmetric_range_matches_brute_force(bits, n, grid):
    # skewed data with a far outlier: the best range is lopsided
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).exp() - 1.5
    x[0] = 40.0
    scheme = QuantScheme(bits=bits, symmetric=False, granularity="tensor")
    _, lo, hi = observe(x, scheme)
    a = torch.linspace(x.min().item(), 0, grid[0])
    b = torch.linspace(0, x.max().item(), grid[1])
    errs = true_mse(x, a.repeat_interleave(len(b)), b.repeat(len(a)), scheme)
    # the valley of asymmetric grids is long (shifting the window costs little): compare errors, not ends
    assert true_mse(x, lo, hi, scheme).item() <= errs.min().item() * 1.002


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_is_per_tensor_on_each_row(symmetric, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 512, generator=g) * torch.tensor([[0.1], [1], [3], [1], [1], [0.01]])
    w[1, 7], w[3, 100], w[4, 0] = 25.0, -12.0, 0.0  # outliers in some rows only
    w[4] = w[4].abs()  # a one-sided row
    kw = {"bits": 4, "symmetric": symmetric}
    monkeypatch.setattr(histogram, "_CHUNK", 1)  # force one group per chunk: chunking must not matter
    per_channel = HistogramObserver(QuantScheme(granularity="channel", **kw))
    per_channel.update(w)
    lo, hi = per_channel.range()
    for r in range(w.shape[0]):
        _, lo_r, hi_r = observe(w[r], QuantScheme(granularity="tensor", **kw))
        torch.testing.assert_close(lo[r, 0].item(), lo_r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(hi[r, 0].item(), hi_r, rtol=1e-6, atol=1e-7)


def test_rebinning_is_exact_as_the_range_grows():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 4000, generator=g) * s + m for s, m in [(0.1, 0.0), (1.0, 0.5), (3.0, -2.0), (0.5, 0.0)]]
    obs = HistogramObserver(QuantScheme(bits=8, symmetric=False, granularity="channel"), bins=256)
    for x in xs:
        obs.update(x)
    data = torch.cat(xs, dim=1).double().numpy()
    for r in range(3):
        edges = obs.lo[r].item() + obs.width[r].item() * np.arange(257)
        assert edges[0] <= data[r].min() and edges[-1] >= data[r].max()
        expected, _ = np.histogram(data[r], bins=edges)
        got = obs.counts[r].numpy()
        assert got.sum() == data.shape[1]
        assert np.abs(got - expected).sum() <= 4  # only values on a bin edge may land either side


def test_growing_range_chooses_as_well_as_one_update():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1 << 14, generator=g) * s for s in (0.5, 1.0, 2.0)]
    xs[-1][0] = 60.0
    scheme = QuantScheme(bits=4, symmetric=True, granularity="tensor")
    streamed = HistogramObserver(scheme)
    for x in xs:
        streamed.update(x)
    x = torch.cat(xs)
    _, lo1, hi1 = observe(x, scheme)
    lo, hi = streamed.range()
    assert true_mse(x, lo, hi, scheme).item() <= true_mse(x, lo1, hi1, scheme).item() * 1.01


def test_too_many_cells_fails_loudly():
    obs = HistogramObserver(QuantScheme(bits=4, granularity="group", group_size=2), bins=2048)
    with pytest.raises(ValueError, match="too many histogram cells"):
        obs.update(torch.zeros(1 << 9, 1 << 9))
