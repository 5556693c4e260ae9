"""OCTAV observer: the MSE-optimal clip of OCTAV's fixed-point iteration (Sakr et al., ICML
2022; the math and our choices are in `quantcore.algorithms.octav`), per tensor, channel or group.

Symmetric schemes get the range [−s, s]; asymmetric ones a clip [a, b] ∋ 0 found for each side;
fp8 schemes (not a uniform grid) their min-max range.

Like the MSE observer it needs the values, not just their extremes: a weight is observed
whole (up to `max_samples` values); activations streamed over many updates are kept as a
uniform sample per quantization group (`GroupReservoir`), on which the expectations of the
iteration are estimated without bias. Below the bound the sample is all the data, so streamed
updates give exactly the range of one update with everything.
"""

from __future__ import annotations

import torch

from quantcore.observers import Observer
from quantcore.observers.reservoir import GroupReservoir
from quantcore.schemes import QuantScheme


class OctavObserver(Observer):
    def __init__(
        self,
        scheme: QuantScheme,
        iterations: int = 50,
        tol: float = 1e-6,
        max_samples: int = 1 << 26,
        seed: int = 0,
    ) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations}")
        if not tol >= 0:
            raise ValueError(f"tol must be non-negative, got {tol}")
        super().__init__(scheme)
        self.iterations, self.tol = iterations, tol
        self.max_samples, self.seed = max_samples, seed
        self.reset()

    def reset(self) -> None:
        self._stat_shape = None
        self.reservoir: GroupReservoir | None = None
        self._range: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, x: torch.Tensor) -> None:
        xg = self._groups(x)
        if self.reservoir is None:
            self.reservoir = GroupReservoir(max(1, self.max_samples // xg.shape[0]), seed=self.seed)
        self.reservoir.add(xg)
        self._range = None

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data(self.reservoir is not None)
        if self._range is None:
            # Imported here: the algorithm module imports this package (its `make_observer`).
            from quantcore.algorithms.octav import octav_range

            assert self.reservoir is not None and self.reservoir.values is not None
            lo, hi = octav_range(self.reservoir.values, self.scheme, self.iterations, self.tol)
            self._range = (self._as_stat(lo), self._as_stat(hi))
        return self._range
