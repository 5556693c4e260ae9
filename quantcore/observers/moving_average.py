"""Moving-average min-max observer: an exponential moving average of each batch's range.

As PyTorch's MovingAverageMinMaxObserver (after Jacob et al., CVPR 2018, where activation
ranges are EMAs during quantization-aware training): the first update sets the range, each
later one moves it a fraction c of the way to that batch's min and max,

    min ← min + c · (min_batch − min),    max ← max + c · (max_batch − max).

A rare extreme batch moves the range by only c of its excess, so it is damped rather than
kept, at the price of depending on the order of the batches.
"""

from __future__ import annotations

import torch

from quantcore.observers.minmax import MinMaxObserver
from quantcore.schemes import QuantScheme


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Min-max's state and range; only the update rule differs."""

    def __init__(self, scheme: QuantScheme, averaging_constant: float = 0.01) -> None:
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant
        super().__init__(scheme)

    def update(self, x: torch.Tensor) -> None:
        xg = self._groups(x)
        lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)
        if self.min_val is None or self.max_val is None:
            self.min_val, self.max_val = lo, hi
            return
        c = self.averaging_constant
        self.min_val = self.min_val + c * (lo - self.min_val)
        self.max_val = self.max_val + c * (hi - self.max_val)
