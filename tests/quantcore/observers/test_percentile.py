"""Percentile observer against numpy.percentile, exact while the reservoir holds everything."""

import numpy as np
import pytest
import torch

from quantcore.observers import PercentileObserver
from quantcore.schemes import QuantScheme


def scheme(granularity="channel", group_size=None):
    return QuantScheme(type="int", bits=8, symmetric=False, granularity=granularity, group_size=group_size)


@pytest.mark.parametrize("p", [99.99, 99.0, 90.0, 100.0])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 8)])
def test_equals_numpy_percentile_over_updates(p, granularity, group_size):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 24, generator=g) ** 3 for _ in range(3)]
    obs = PercentileObserver(scheme(granularity, group_size), percentile=p)
    for x in xs:
        obs.update(x)
    if granularity == "tensor":
        rows = [x.numpy().reshape(1, -1) for x in xs]
    elif granularity == "channel":
        rows = [x.numpy() for x in xs]
    else:
        rows = [x.numpy().reshape(-1, 8) for x in xs]
    pooled = np.concatenate(rows, axis=1)
    lo, hi = obs.range()
    np.testing.assert_allclose(lo.numpy().reshape(-1), np.percentile(pooled, 100 - p, axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hi.numpy().reshape(-1), np.percentile(pooled, p, axis=1), rtol=1e-5, atol=1e-6)


def test_memory_bounded_and_close_on_large_streams():
    obs = PercentileObserver(scheme("tensor"), percentile=99.0, max_samples=20_000)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        obs.update(torch.rand(10_000, generator=g))
    assert obs.reservoir.values.shape == (1, 20_000)
    assert obs.reservoir.seen == 200_000
    lo, hi = obs.range()
    # quantile level error of a 20k sample: sqrt(.01 · .99 / 20000) ≈ 0.0007
    assert abs(hi.item() - 0.99) < 0.004 and abs(lo.item() - 0.01) < 0.004


def test_rejects_bad_percentile():
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(scheme(), percentile=30)
