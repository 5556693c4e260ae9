"""PACT: Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan, "PACT: Parameterized
Clipping Activation for Quantized Neural Networks" (2018, arXiv 1805.06085).

A ReLU's output has no upper bound, so a fixed grid over it either clips big values or wastes
levels on rare ones. PACT replaces the ReLU's output range by a learned clip α:

    y   = PACT(x) = 0.5 (|x| − |x − α| + α) = clip(x, 0, α)                 (eq. 1)
    y_q = ⌊y · (2^k − 1)/α⌉ · α/(2^k − 1)                                     (eq. 2)

    ∂y_q/∂α = ∂y_q/∂y · ∂y/∂α = 1 if x ≥ α, else 0                            (eq. 3)

(the straight-through estimator for the rounding, ∂y_q/∂y = 1): α grows while clipping costs
more loss than it saves, and an L2 penalty λ_α α² (the paper's weight decay on α) pulls it
down. ∂y_q/∂x is 1 on [0, α) and 0 elsewhere.

The paper trains from scratch with α = 10; qforge fine-tunes a trained network, whose
activation range is known, so α starts at the largest input of the first batch.
PACT quantizes activations; the weights are quantized by another quantizer (the paper uses
DoReFa's; qforge's QAT pairs PACT with LSQ weights, so the method's row isolates the
activation quantizer).
"""

from __future__ import annotations

import torch
from torch import nn

from quantcore.algorithms.quantsim import FakeQuantizer


class PACTQuantizer(FakeQuantizer):
    def __init__(self, bits: int, signed: bool | None = None, alpha_decay: float = 1e-4) -> None:
        if signed:
            raise ValueError("PACT clips a ReLU's output to [0, α]: it quantizes non-negative activations only")
        if alpha_decay < 0:
            raise ValueError(f"alpha_decay must be non-negative, got {alpha_decay}")
        super().__init__(bits, signed=False)
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.alpha_decay = alpha_decay

    def initialize(self, x: torch.Tensor) -> None:
        self.alpha.data.fill_(max(x.max().item(), 1e-3))

    def penalty(self) -> torch.Tensor:
        """λ_α α², added to the training loss."""
        return self.alpha_decay * self.alpha.pow(2)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        # eq. 1, clip(x, 0, α), written so that the kinks get eq. 3's one-sided gradients
        # (the paper's 0.5(|x| − |x − α| + α) gives 0.5 at x = α, where the first batch's max sits)
        y = torch.where(x >= alpha, alpha, x.clamp(min=0))
        levels = 2**self.bits - 1
        # eq. 2 forward, eq. 3 backward: the rounding's error is a constant to autograd
        y_q = torch.round(y.detach() * levels / alpha.detach()) * alpha.detach() / levels
        return y + (y_q - y).detach()
