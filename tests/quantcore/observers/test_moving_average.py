"""Moving-average min-max observer against the recurrence written out by hand."""

import numpy as np
import pytest
import torch

from quantcore.observers import MovingAverageMinMaxObserver
from quantcore.schemes import QuantScheme


def scheme():
    return QuantScheme(type="int", bits=4, granularity="channel")


def test_moving_average_equals_recurrence():
    c = 0.1
    obs = MovingAverageMinMaxObserver(scheme(), averaging_constant=c)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 16, generator=g) * (i + 1) for i in range(6)]
    lo = hi = None
    for x in xs:
        obs.update(x)
        b_lo, b_hi = x.numpy().min(1), x.numpy().max(1)
        if lo is None:
            lo, hi = b_lo, b_hi
        else:
            lo, hi = (1 - c) * lo + c * b_lo, (1 - c) * hi + c * b_hi
    got_lo, got_hi = obs.range()
    np.testing.assert_allclose(got_lo.numpy().reshape(-1), lo, rtol=1e-5)
    np.testing.assert_allclose(got_hi.numpy().reshape(-1), hi, rtol=1e-5)


def test_moving_average_rejects_bad_constant():
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(scheme(), averaging_constant=0)
