"""A bounded uniform sample of the values seen per quantization group.

The percentile and MSE observers need the values themselves, not a summary, but calibration
can stream far more activations than fit in memory. `GroupReservoir` keeps every value until
a group holds `capacity` of them, and from then on a uniform sample without replacement of
all values seen (reservoir sampling, Vitter, "Random Sampling with a Reservoir", ACM TOMS
1985). Below the capacity the statistics are therefore exact.

Batches are merged whole instead of element by element: if n values have been seen (the
reservoir holding a uniform sample of them) and m arrive, a uniform sample of size R of all
n + m holds k ~ Hypergeometric(m new, n old, R draws) new ones. So we keep a random R − k of
the reservoir and a random k of the batch. Every group receives the same number of values
per update, so one draw of k and of the kept columns serves all groups: each group's sample
is still uniform (the groups' samples are merely correlated in *which* positions they keep).
"""

from __future__ import annotations

import numpy as np
import torch

# numpy's hypergeometric sampler accepts populations below 10**9; beyond that the binomial
# is an excellent approximation (drawing R from a population that large is nearly with replacement).
_HYPERGEOMETRIC_LIMIT = 10**9


class GroupReservoir:
    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.values: torch.Tensor | None = None  # (G, r), r = min(seen, capacity)
        self.seen = 0  # values seen per group
        self._rng = np.random.default_rng(self.seed)

    def add(self, xg: torch.Tensor) -> None:
        """Add a (G, m) batch: m new values for each of G groups."""
        m, cap = xg.shape[-1], self.capacity
        if self.values is None:
            self.values = xg[:, self._choose(m, cap, xg.device)] if m > cap else xg.clone()
            self.seen = m
            return
        n, r = self.seen, self.values.shape[-1]
        if n + m <= cap:
            self.values = torch.cat([self.values, xg], dim=-1)
        else:
            if n + m < _HYPERGEOMETRIC_LIMIT:
                k = int(self._rng.hypergeometric(m, n, cap))
            else:
                k = int(self._rng.binomial(cap, m / (n + m)))
            k = min(max(k, cap - r), m)  # exact for the hypergeometric; keeps the binomial feasible
            keep_old = self.values[:, self._choose(r, cap - k, xg.device)]
            take_new = xg[:, self._choose(m, k, xg.device)]
            self.values = torch.cat([keep_old, take_new], dim=-1)
        self.seen = n + m

    def _choose(self, population: int, k: int, device: torch.device) -> torch.Tensor:
        """k distinct positions out of `population`, in increasing order."""
        idx = self._rng.choice(population, size=k, replace=False)
        return torch.as_tensor(np.sort(idx), dtype=torch.long, device=device)
