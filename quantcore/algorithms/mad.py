"""MAD with OCTAV re-clipping: Sakr, Dai, Venkatesan, Zimmer, Dally, Khailany, "Optimal Clipping
and Magnitude-aware Differentiation for Improved Quantization-aware Training" (ICML 2022).

OCTAV re-clipping. The clip s is not learned: at every training step it is set to the clip
that minimises the quantization MSE of the tensor being quantized (the current weight, the
current batch of inputs), found by OCTAV's fixed-point iteration (`octav.py`). Every step then
quantizes with the least noise its grid allows:

    x̂ = s/Q · ⌊clamp(x, −s, s) · Q/s⌉,     s = OCTAV(x)

Q is the grid's largest code: 2^{b−1} − 1 on a signed grid (codes −Q..Q span [−s, s], as in
`octav.py`), 2^b − 1 on an unsigned one (codes 0..Q span [0, s], clamp to [0, s]).

Unsigned grids. A b-bit unsigned grid on [0, s] has the step s/(2^b − 1); a (b+1)-bit signed
grid on [−s, s] in `octav.py` has the step s/Q with Q = 2^b − 1: the same step, so the same
rounding noise c·s², c = 1/(12 (2^b − 1)²). On non-negative data |X| = X and the clipping term
E[(|X| − s)² 1{|X| > s}] is the error of the upper clip alone. OCTAV's model J(s) for the
(b+1)-bit symmetric grid is therefore exactly the model for the b-bit unsigned grid, and we
call `octav_clip(x⁺, bits + 1)` on x⁺ = max(x, 0) (what the unsigned grid sees: a negative
value is clipped to 0 whatever s is, an error that does not depend on s).

MAD, magnitude-aware differentiation. The paper finds both usual derivatives of the clipped
quantizer wanting: the STE's (1 everywhere) passes the gradients of clipped values at full
strength (gradient explosion), the piece-wise linear one (PWL: 1 inside, 0 outside) never lets
a clipped value back (convergence stops). MAD keeps the gradient of a clipped value but scales
it by the clip's ratio, reading the clip as a rescaling of x by s/|x|, a constant to the
derivative:

    clamp(x, −s, s) = x · s / max(|x|, s)

    ∂x̂/∂x = 1          if |x| ≤ s
            s / |x|    if |x| > s

(with the STE for the rounding inside). On an unsigned grid, values above s follow the same
rule (s/x) and negative values, clipped to 0, get no gradient. s gets no gradient: it is
re-clipped, not learned.

Options:
* `reclip_every` (default 1, the paper's every step): re-clip every k-th training forward; s
  is kept in between.
* `momentum` (default 0.1): activations keep an exponential moving average of the re-clipped
  s, s_ema ← s_ema + momentum · (s − s_ema), which eval mode uses frozen (a deployed network
  cannot run OCTAV on each batch). A weight's eval clip is the last one training computed (its
  weight is what training left it), frozen as well.
* `iterations` (default 50): OCTAV's fixed-point iterations at most.

The paper's best activation rule, MPH (MAD for weights, PWL for activations), is not this
quantizer's: it uses MAD for both.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from quantcore.algorithms.octav import octav_clip
from quantcore.algorithms.quantsim import FakeQuantizer, round_ste


class MADOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reclip_every: int = Field(1, ge=1, description="re-clip with OCTAV every k-th training forward")
    momentum: float = Field(0.1, gt=0, le=1, description="EMA momentum of an activation's clip, for eval mode")
    iterations: int = Field(50, ge=1, le=1000, description="OCTAV fixed-point iterations at most")


def magnitude_aware_clamp(x: torch.Tensor, s: torch.Tensor, signed: bool) -> torch.Tensor:
    """clamp(x, −s, s) (signed) or clamp(x, 0, s) forward; derivative 1 inside, s/|x| beyond s,
    0 below 0 on an unsigned grid."""
    if not signed:
        x = torch.clamp(x, min=0)  # negatives: 0, gradient 0
    # x · s/max(|x|, s): x inside, ±s outside; the ratio is a constant to autograd (MAD)
    ratio = s / torch.maximum(x.abs(), s)
    return x * ratio.detach()


class MADQuantizer(FakeQuantizer):
    """OCTAV's MSE-optimal clip, recomputed during training, and MAD's gradient."""

    def __init__(self, bits: int, signed: bool | None = None, **options: Any) -> None:
        parsed = MADOptions(**options)  # pydantic's ValidationError is a ValueError
        super().__init__(bits, signed)
        self.options = parsed
        self.register_buffer("clip", torch.tensor(1.0))  # s of the last re-clip (training)
        self.register_buffer("clip_ema", torch.tensor(1.0))  # EMA of s (an activation's eval clip)
        self.register_buffer("steps", torch.tensor(0))  # training forwards so far

    @property
    def Q(self) -> int:
        """The largest code: ±Q (signed) or 0..Q (unsigned) span the clip range."""
        return self.qmax

    def octav(self, x: torch.Tensor) -> torch.Tensor:
        """OCTAV's clip of x for this quantizer's grid (a 0-dim tensor)."""
        rows = x.detach().float().reshape(1, -1)
        if self.signed:
            return octav_clip(rows, self.bits, self.options.iterations)[0]
        # b-bit unsigned on [0, s] = (b+1)-bit symmetric on [−s, s] (module docstring)
        return octav_clip(rows.clamp(min=0), self.bits + 1, self.options.iterations)[0]

    def initialize(self, x: torch.Tensor) -> None:
        s = self.octav(x)
        self.clip.copy_(s)
        self.clip_ema.copy_(s)

    def current_clip(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.clip_ema if self.activation else self.clip
        if int(self.steps) % self.options.reclip_every == 0:
            with torch.no_grad():
                s = self.octav(x)
                self.clip.copy_(s)
                self.clip_ema.add_(self.options.momentum * (s - self.clip_ema))
        self.steps.add_(1)
        return self.clip

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = self.current_clip(x).to(x.dtype)
        Q = self.Q
        x_c = magnitude_aware_clamp(x, s, bool(self.signed))
        return round_ste(x_c * (Q / s)) * (s / Q)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reclip_every={self.options.reclip_every}, momentum={self.options.momentum}"
