"""MSE observer: shrink the min-max range by the ratio of least actual squared error.

The search of GPTQ's quantizer (Frantar et al., "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", ICLR 2023, `Quantizer.find_params` with `mse=True`,
grid=100, maxshrink=0.8; llm-compressor's MSE observer is the same search): for ratios
p = 1, 1 − 1/grid, …, down to 1 − maxshrink, quantize with the range [p·min, p·max], measure
the error per quantization group, and keep each group's best p. GPTQ measures Σ|x − x̂|^2.4;
we measure Σ (x − x̂)², the error this observer is named after and the one the histogram
observer estimates. Nothing is modelled: x̂ is the real `fake_quant`, rounding of S and Z included.

It needs the data. A weight is observed once and kept whole up to `max_samples` values
(2^26, 256 MiB of float32 by default: more than an 8B model's largest MLP projection,
14336 × 4096); for activations streamed over many updates, and beyond that size, the error
is measured on a uniform sample of everything seen (`GroupReservoir`), an unbiased estimate
of the error over all of it. The ratios scale the exact running min and max, not the sample's.
"""

from __future__ import annotations

import torch

from quantcore.observers import Observer
from quantcore.observers.reservoir import GroupReservoir
from quantcore.qparams import fake_quant, qparams_from_range
from quantcore.schemes import Granularity, QuantScheme


class MSEObserver(Observer):
    def __init__(
        self,
        scheme: QuantScheme,
        grid: int = 100,
        maxshrink: float = 0.8,
        max_samples: int = 1 << 26,
        seed: int = 0,
    ) -> None:
        if grid < 1:
            raise ValueError(f"grid must be a positive integer, got {grid}")
        if not 0 <= maxshrink < 1:
            raise ValueError(f"maxshrink must be in [0, 1), got {maxshrink}")
        super().__init__(scheme)
        self.grid, self.maxshrink = grid, maxshrink
        self.max_samples, self.seed = max_samples, seed
        # The search runs on the (G, r) sample: one S/Z per row is per-channel quantization of it.
        self._rows = scheme.model_copy(update={"granularity": Granularity.CHANNEL, "group_size": None})
        self.reset()

    def reset(self) -> None:
        self._stat_shape = None
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.reservoir: GroupReservoir | None = None
        self._range: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, x: torch.Tensor) -> None:
        xg = self._groups(x)
        lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)
        if self.reservoir is None or self.min_val is None or self.max_val is None:
            self.reservoir = GroupReservoir(max(1, self.max_samples // xg.shape[0]), seed=self.seed)
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.reservoir.add(xg)
        self._range = None

    def ratios(self) -> list[float]:
        """The clip ratios tried, largest (no clipping) first: ties keep the wider range."""
        return [1 - i / self.grid for i in range(max(1, int(self.maxshrink * self.grid)))]

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data(self.reservoir is not None)
        if self._range is None:
            assert self.reservoir is not None and self.reservoir.values is not None
            assert self.min_val is not None and self.max_val is not None
            x = self.reservoir.values
            lo, hi = self.min_val[:, None].clamp(max=0), self.max_val[:, None].clamp(min=0)
            best_err = torch.full_like(lo, float("inf"))
            best_p = torch.ones_like(lo)
            for p in self.ratios():
                err = self._error(x, p * lo, p * hi)
                better = err < best_err  # strict: the first (widest) ratio wins a tie
                best_err, best_p = torch.where(better, err, best_err), torch.where(better, p, best_p)
            self._range = (self._as_stat(best_p * lo), self._as_stat(best_p * hi))
        return self._range

    def _error(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """||x − fake_quant(x)||² of each row of the sample, for its range [lo, hi]."""
        qp = qparams_from_range(lo, hi, self._rows)
        return (fake_quant(x, qp) - x).double().pow(2).sum(-1, keepdim=True)
