"""Min-max observer against numpy, per tensor, channel and group, over several updates."""

import numpy as np
import pytest
import torch

from quantcore.observers import MinMaxObserver
from quantcore.schemes import QuantScheme


def scheme(granularity="channel", group_size=None, **kw):
    return QuantScheme(type="int", bits=4, granularity=granularity, group_size=group_size, **kw)


def batches(n=4, shape=(6, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * (i + 1) for i in range(n)]


def numpy_groups(x: np.ndarray, granularity, group_size=None) -> np.ndarray:
    """The groups written out by hand: rows of (G, n)."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":
        return x.reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1, group_size).reshape(-1, group_size)


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 4)])
def test_minmax_equals_numpy_over_updates(granularity, group_size):
    obs = MinMaxObserver(scheme(granularity, group_size))
    xs = batches()
    for x in xs:
        obs.update(x)
    groups = np.concatenate([numpy_groups(x.numpy(), granularity, group_size) for x in xs], axis=1)
    lo, hi = obs.range()
    np.testing.assert_array_equal(lo.numpy().reshape(-1), groups.min(1))
    np.testing.assert_array_equal(hi.numpy().reshape(-1), groups.max(1))
    # S has the shape the grouped view gives it
    expected_shape = {"tensor": (1, 1), "channel": (6, 1), "group": (6, 4, 1)}[granularity]
    assert obs.qparams().scale.shape == expected_shape
    amax = np.maximum(-groups.min(1), groups.max(1))
    np.testing.assert_allclose(obs.qparams().scale.numpy().reshape(-1), amax / 7, rtol=1e-6)
