"""OCTAV observer: per-channel and per-group rows each get the clip the row gets alone, streamed
updates give the clip of one update with all the data, and the range has the shape of S.
(The clip itself is tested against grid searches in tests/quantcore/algorithms/test_octav_algorithm.py.)"""

import pytest
import torch

from quantcore.observers import OctavObserver, make_observer
from quantcore.qparams import fake_quant, qparams_from_range
from quantcore.schemes import QuantScheme


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(4.0).sample((rows, cols)) * torch.linspace(0.5, 3, rows)[:, None]


def observed(scheme: QuantScheme, *xs: torch.Tensor, **options) -> OctavObserver:
    obs = make_observer(scheme, **options)
    assert isinstance(obs, OctavObserver)
    for x in xs:
        obs.update(x)
    return obs


@pytest.mark.parametrize("symmetric", [True, False])
def test_each_channel_gets_the_clip_of_that_row_alone(symmetric):
    w = heavy_tailed(6, 256)
    lo, hi = observed(QuantScheme(bits=3, symmetric=symmetric, granularity="channel", observer="octav"), w).range()
    assert lo.shape == hi.shape == (6, 1)
    for r in range(6):
        alone = observed(QuantScheme(bits=3, symmetric=symmetric, granularity="tensor", observer="octav"), w[r])
        a, b = alone.range()
        assert a.shape == (1, 1)
        torch.testing.assert_close(lo[r], a[0])
        torch.testing.assert_close(hi[r], b[0])
    assert (hi < w.amax(1, keepdim=True)).all()  # heavy tails at 3 bits: every row is clipped
    if symmetric:
        torch.testing.assert_close(lo, -hi)


def test_each_group_gets_the_clip_of_that_group_alone():
    w = heavy_tailed(4, 128, seed=1)
    lo, hi = observed(QuantScheme(bits=4, granularity="group", group_size=32, observer="octav"), w).range()
    assert hi.shape == (4, 4, 1)
    for r in range(4):
        for g in range(4):
            alone = observed(QuantScheme(bits=4, granularity="tensor", observer="octav"), w[r, 32 * g : 32 * (g + 1)])
            torch.testing.assert_close(hi[r, g], alone.range()[1][0])


@pytest.mark.parametrize("symmetric", [True, False])
def test_streamed_updates_equal_one_update_with_all_the_data(symmetric):
    x = heavy_tailed(5, 300, seed=2) + (0.0 if symmetric else 0.7)
    scheme = QuantScheme(bits=4, symmetric=symmetric, granularity="channel", observer="octav")
    whole = observed(scheme, x)
    streamed = observed(scheme, *x.split([100, 37, 150, 13], dim=1))
    torch.testing.assert_close(streamed.range(), whole.range(), rtol=0, atol=0)
    qp_whole, qp_streamed = whole.qparams(), streamed.qparams()
    torch.testing.assert_close(qp_streamed.scale, qp_whole.scale)
    torch.testing.assert_close(qp_streamed.zero_point, qp_whole.zero_point)


def test_beyond_the_sample_bound_the_clip_is_estimated_from_a_uniform_sample():
    torch.manual_seed(3)
    xs = [torch.distributions.Laplace(0.0, 1.0).sample((2, 4000)) for _ in range(5)]
    scheme = QuantScheme(bits=4, granularity="channel", observer="octav")
    exact = observed(scheme, torch.cat(xs, dim=1)).range()[1]
    sampled = observed(scheme, *xs, max_samples=2 * 10000).range()[1]  # half the data per row
    torch.testing.assert_close(sampled, exact, rtol=0.05, atol=0)


def test_octav_lowers_the_real_error_of_heavy_tailed_channels():
    w = heavy_tailed(8, 512, seed=4)
    scheme = QuantScheme(bits=4, granularity="channel", observer="octav")
    octav = fake_quant(w, observed(scheme, w).qparams())
    minmax = fake_quant(w, qparams_from_range(w.amin(1, keepdim=True), w.amax(1, keepdim=True), scheme))
    assert (octav - w).pow(2).sum() < 0.8 * (minmax - w).pow(2).sum()


def test_degenerate_data_fp8_reset_and_no_data():
    zeros = observed(QuantScheme(bits=4, granularity="channel", observer="octav"), torch.zeros(3, 8))
    lo, hi = zeros.range()
    assert torch.isfinite(hi).all() and (hi > 0).all() and (lo < 0).all()
    assert (fake_quant(torch.zeros(3, 8), zeros.qparams()) == 0).all()
    x = heavy_tailed(2, 64, seed=5)
    fp8 = observed(QuantScheme(type="fp8_e4m3", granularity="channel", observer="octav"), x)
    torch.testing.assert_close(fp8.range()[1], x.amax(1, keepdim=True))  # not a uniform grid: min-max
    fp8.reset()
    with pytest.raises(RuntimeError, match="no data"):
        fp8.range()
    with pytest.raises(ValueError, match="iterations"):
        OctavObserver(QuantScheme(observer="octav"), iterations=0)
