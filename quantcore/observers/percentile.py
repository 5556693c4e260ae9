"""Percentile observer: the range runs from the (100 − p)-th to the p-th percentile.

Clipping a tiny tail of extreme values buys a smaller S for all the others; percentile
calibration (Wu et al., "Integer Quantization for Deep Learning Inference: Principles and
Empirical Evaluation", NVIDIA 2020, which compares 99.9 … 99.9999 with max and entropy
calibration) is the simplest way to choose how much. a = P_{100−p}(x), b = P_p(x) per
quantization group, with numpy's default ("linear") interpolation between order statistics.

Memory: percentiles need the values, so they are kept in a `GroupReservoir` of at most
`max_samples` values in all (split evenly over the groups). Until a group has seen more than
its share, the percentiles are exact over *all* updates (pooled, not averaged per batch);
beyond it they are those of a uniform sample of R values per group, whose quantile level
q = p/100 is off by about sqrt(q (1 − q) / R). We chose pooling over averaging per-batch
percentiles because an average depends on how the data was batched and lets one outlier
batch drag the range by a 1/n_batches share of its excess, while a pooled percentile is a
property of the data alone.
"""

from __future__ import annotations

import torch

from quantcore.observers import Observer
from quantcore.observers.reservoir import GroupReservoir
from quantcore.schemes import QuantScheme


def row_percentile(values: torch.Tensor, p: float) -> torch.Tensor:
    """p-th percentile of each row of a (G, r) matrix, interpolated like numpy.percentile."""
    r = values.shape[-1]
    pos = (p / 100.0) * (r - 1)
    k = min(int(pos), r - 1)
    frac = pos - k
    below = values.kthvalue(k + 1, dim=-1).values  # kthvalue counts from 1
    if frac == 0 or k + 1 >= r:
        return below
    above = values.kthvalue(k + 2, dim=-1).values
    return below + frac * (above - below)


class PercentileObserver(Observer):
    def __init__(
        self,
        scheme: QuantScheme,
        percentile: float = 99.99,
        max_samples: int = 1 << 24,
        seed: int = 0,
    ) -> None:
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(scheme)
        self.percentile = percentile
        self.max_samples = max_samples
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self._stat_shape = None
        self.reservoir: GroupReservoir | None = None

    def update(self, x: torch.Tensor) -> None:
        xg = self._groups(x)
        if self.reservoir is None:
            self.reservoir = GroupReservoir(max(1, self.max_samples // xg.shape[0]), seed=self.seed)
        self.reservoir.add(xg)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data(self.reservoir is not None)
        assert self.reservoir is not None and self.reservoir.values is not None
        values = self.reservoir.values
        lo = row_percentile(values, 100.0 - self.percentile)
        hi = row_percentile(values, self.percentile)
        return self._as_stat(lo), self._as_stat(hi)
