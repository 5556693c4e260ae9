"""LSQ and LSQ+: quantizers whose step size (and offset) are learned by gradient descent.

LSQ — Esser, McKinstry, Bablani, Appuswamy, Modha, "Learned Step Size Quantization"
(ICLR 2020):

    v̂ = ⌊clip(v / s, −Q_N, Q_P)⌉ · s                                        (eq. 1-2)

    ∂v̂/∂s = −v/s + ⌊v/s⌉   if −Q_N < v/s < Q_P                             (eq. 3)
            −Q_N            if v/s ≤ −Q_N
             Q_P            if v/s ≥ Q_P

with the straight-through estimator for ⌊·⌉ (∂v̂/∂v = 1 inside the range, 0 outside). The
gradient reaching s is scaled by g = 1/√(N · Q_P) (section 2.2; N the number of weights of
the layer, or of features of the activation) so that s learns at the pace of the weights, and
s starts at 2⟨|v|⟩/√Q_P.

LSQ+ — Bhalgat, Lee, Nagel, Blankevoort, Kwak, "LSQ+: Improving low-bit quantization through
learnable offsets and better initialization" (CVPR workshops 2020): activations that are not
non-negative (Swish, GELU, a residual stream) waste half of an unsigned grid or a level of a
signed one, so an offset β is learned too:

    v̂ = ⌊clip((v − β) / s, −Q_N, Q_P)⌉ · s + β                               (eq. 4)

and both start from a range that minimises the quantization error (section 3.3: weights from
μ ± 3σ, activations from their min and max; we fit activations by minimising the MSE over
the first batch, one of the paper's two choices). Gradient scaling as in LSQ, for s and β.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantcore.algorithms.quantsim import FakeQuantizer, round_ste


def scale_gradient(p: torch.Tensor, g: float) -> torch.Tensor:
    """p forward, g · ∂/∂p backward."""
    return (p - p * g).detach() + p * g


class LSQQuantizer(FakeQuantizer):
    """LSQ: learned step size s, grid [−Q_N, Q_P] (signed) or [0, Q_P] (unsigned)."""

    def __init__(self, bits: int, signed: bool | None = None) -> None:
        super().__init__(bits, signed)
        self.s = nn.Parameter(torch.tensor(1.0))

    @property
    def Q_N(self) -> int:
        return -self.qmin

    @property
    def Q_P(self) -> int:
        return self.qmax

    def initialize(self, x: torch.Tensor) -> None:
        self.s.data.fill_(max(2 * x.abs().mean().item() / math.sqrt(self.Q_P), 1e-8))

    def gradient_scale(self, x: torch.Tensor) -> float:
        # N: a weight's elements, or the features of one sample of an activation batch
        features = x[0].numel() if self.activation and x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(features * self.Q_P)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        s = scale_gradient(self.s, self.gradient_scale(x))
        return round_ste(torch.clamp(x / s, -self.Q_N, self.Q_P)) * s


class LSQPlusQuantizer(LSQQuantizer):
    """LSQ+: learned step size s and offset β; the grid is unsigned [0, 2^b − 1] (shifted by β)
    unless `signed` is asked for."""

    def __init__(self, bits: int, signed: bool | None = None) -> None:
        # The offset makes the grid's sign irrelevant to the values it can hold; unsigned by
        # default, as in the paper's asymmetric activation quantizer.
        super().__init__(bits, False if signed is None else signed)
        self.beta = nn.Parameter(torch.tensor(0.0))

    def initialize(self, x: torch.Tensor) -> None:
        """The range [a, b] with the least squared error on x, from a grid of clips of its min
        and max (the paper's MSE initialisation); s = (b − a)/(Q_P + Q_N), β = a + Q_N·s."""
        lo, hi = x.min().float(), x.max().float()
        sample = x.flatten().float()
        if sample.numel() > 65536:
            sample = sample[torch.randperm(sample.numel(), generator=torch.Generator().manual_seed(0))[:65536]]
        best = (math.inf, lo, hi)
        for shrink_lo in torch.linspace(0.5, 1.0, 11):
            for shrink_hi in torch.linspace(0.3, 1.0, 15):
                a, b = lo * shrink_lo, hi * shrink_hi
                if not b > a:
                    continue
                s = (b - a) / (self.Q_P + self.Q_N)
                beta = a + self.Q_N * s
                q = torch.round(torch.clamp((sample - beta) / s, -self.Q_N, self.Q_P)) * s + beta
                error = float((q - sample).pow(2).mean())
                if error < best[0]:
                    best = (error, a, b)
        _, a, b = best
        s = (b - a) / (self.Q_P + self.Q_N) if b > a else torch.tensor(1.0)
        self.s.data.fill_(float(s))
        self.beta.data.fill_(float(a + self.Q_N * s))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gradient_scale(x)
        s, beta = scale_gradient(self.s, g), scale_gradient(self.beta, g)
        return round_ste(torch.clamp((x - beta) / s, -self.Q_N, self.Q_P)) * s + beta
