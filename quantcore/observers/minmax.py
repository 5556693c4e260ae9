"""Min-max observer: the grid covers exactly the values seen.

The baseline calibration of Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference" (CVPR 2018), and PyTorch's MinMaxObserver:
a = min x, b = max x over every update, per quantization group. Nothing is clipped, so one
outlier sets S for the whole group; the other observers trade that for clipping.
"""

from __future__ import annotations

import torch

from quantcore.observers import Observer
from quantcore.schemes import QuantScheme


class MinMaxObserver(Observer):
    def __init__(self, scheme: QuantScheme) -> None:
        super().__init__(scheme)
        self.reset()

    def reset(self) -> None:
        self._stat_shape = None
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        xg = self._groups(x)
        lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data(self.min_val is not None)
        assert self.min_val is not None and self.max_val is not None
        return self._as_stat(self.min_val), self._as_stat(self.max_val)
