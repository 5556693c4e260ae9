"""N2UQ: Liu, Cheng, Huang, Xing, Shen, "Nonuniform-to-Uniform Quantization: Towards Accurate
Quantization via Generalized Straight-Through Estimation" (CVPR 2022, arXiv 2111.14826).

A uniform quantizer spaces both its input thresholds and its output levels evenly. N2UQ learns
where the thresholds T_1 < … < T_n (n = 2^b − 1) sit, so that they follow the activations'
distribution, while the outputs stay on a uniform grid: a deployed layer still multiplies
integers, and only the comparisons that produce them move.

    forward:    x^q = s · (l + #{i : x ≥ T_i})                    (uniform levels l … u)
    thresholds: d_0 learned,  d_i = d_0 + a_1 + … + a_i,  a_i ≥ ε > 0,
                T_i = d_{i−1} + a_i / 2                            (middle of interval i)

The count jumps by one at each T_i, whatever the gaps between them, so its derivative is zero
almost everywhere and says nothing about where the thresholds should go. The paper's
generalized straight-through estimator (G-STE) backpropagates through the *expectation* of a
stochastic version of the quantizer instead: inside the interval (d_{i−1}, d_i], round up to
level i with probability (x − d_{i−1}) / a_i. That expectation is the piecewise-linear

    F(x) = (i − 1) + (x − d_{i−1}) / a_i   on (d_{i−1}, d_i],   0 up to d_0,   n above d_n,

whose rounding is the forward count above (F crosses i − ½ at T_i), and

    ∂x^q/∂x   = s / a_i  inside interval i, 0 outside (d_0, d_n]   (plain STE when all a_i = s)
    ∂x^q/∂a_k = −s / a_i for k < i,   −s (x − d_{i−1}) / a_i² for k = i,   0 for k > i
    ∂x^q/∂d_0 = −s / a_i,             ∂x^q/∂s = l + #{i : x ≥ T_i}

all of which autograd derives from F. As in the released code, the interval lengths are
floored at a small ε (so the thresholds can never cross), the start d_0 and the output step s
are learned too (the code's `start` and `scale2`; its input scale `scale1` is left out: scaling
x is the same as scaling d_0 and every a_i). The code starts from unit-range constants after a
learned bias; qforge fine-tunes a trained network, so the quantizer starts as the uniform
quantizer over the first batch (a_i = s, d_0 = l·s: thresholds half a step below each level).
Post-ReLU inputs use the unsigned grid [0, 2^b − 1]; signed inputs the signed grid, with d_0
at the bottom of the first batch's (symmetric) range.

Entropy-preserving weight regularization (the paper's, as the released code implements it):
the weights are divided by α = γ · mean|W| (per output channel, γ = (2^b − 1)/2^(b−1)) and
quantized uniformly on [−1, 1] to the 2^b levels ±1/(2^b − 1), ±3/(2^b − 1), …, ±1. A weight
spread evenly over these levels has mean |level| = 1/γ, so this α makes the normalized
weights' L1 norm that of a code with maximal entropy — every level used about as often. It
is a rescaling, not a loss term: `N2UQWeightQuantizer`. Its gradient is the identity STE (the
released code's is 1/α times that, an artefact of taking the STE on W/α).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.algorithms.quantsim import FakeQuantizer


class N2UQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_interval: float = Field(1e-3, gt=0, lt=1, description="ε, the floor of every a_i, per initial step")


class N2UQQuantizer(FakeQuantizer):
    """N2UQ's activation quantizer: learned thresholds T_i, uniform output levels, G-STE."""

    def __init__(self, bits: int, signed: bool | None = None, **options) -> None:
        super().__init__(bits, signed)
        self.options = N2UQOptions(**options)
        n = 2**bits - 1
        self.start = nn.Parameter(torch.tensor(0.0))  # d_0
        self.a = nn.Parameter(torch.full((n,), 1.0 / n))  # interval lengths, floored at ε when used
        self.s = nn.Parameter(torch.tensor(1.0 / n))  # output step
        self.register_buffer("eps", torch.tensor(self.options.min_interval / n))

    @property
    def n(self) -> int:
        return 2**self.bits - 1

    def initialize(self, x: torch.Tensor) -> None:
        """The uniform quantizer over the first batch: s from its range (as StaticQuantizer),
        every a_i = s and d_0 = l·s, so that T_i = (l + i − ½)·s."""
        x = x.float()
        high = float(x.max().clamp(min=0))
        s = max(float(-x.min().clamp(max=0)) / -self.qmin, high / self.qmax) if self.signed else high / self.qmax
        if not s > 0 or s == float("inf"):
            s = 1.0
        self.s.data.fill_(s)
        self.a.data.fill_(s)
        self.start.data.fill_(self.qmin * s)
        self.eps.fill_(self.options.min_interval * s)

    def interval_lengths(self) -> torch.Tensor:
        """a_i floored at ε, as the released code's max(a, ε): a raw a_i pushed below ε is used
        as ε and gets no more gradient, so the thresholds stay at least ε apart."""
        return torch.clamp(self.a, min=self.eps)

    def edges(self) -> torch.Tensor:
        """d_0 < d_1 < … < d_n, the ends of the G-STE's linear pieces."""
        a = self.interval_lengths()
        return self.start + torch.cat([a.new_zeros(1), torch.cumsum(a, 0)])

    def thresholds(self) -> torch.Tensor:
        """T_1 < … < T_n, where the output steps up by one level."""
        return self.edges()[:-1] + self.interval_lengths() / 2

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        a = self.interval_lengths()
        d = self.start + torch.cat([a.new_zeros(1), torch.cumsum(a, 0)])
        T = d[:-1] + a / 2
        flat = x.reshape(-1)
        key = flat.detach().contiguous()
        # Forward: the number of thresholds crossed (searchsorted: no (N, n) comparison table)
        crossed = torch.searchsorted(T.detach().to(key.dtype).contiguous(), key, right=True)
        # Backward: F, the expectation of stochastic rounding in the interval (d_{i−1}, d_i]
        # holding x; constant (gradient 0) from d_0 down, as in the released code, so the
        # exact zeros of a ReLU do not pull on d_0
        above = torch.searchsorted(d.detach().to(key.dtype).contiguous(), key)  # #{j : d_j < x}
        i = (above - 1).clamp(0, self.n - 1)
        inside = (above >= 1) & (above <= self.n)
        F = torch.where(inside, i + (flat - d[i]) / a[i], (above > self.n).to(flat.dtype) * self.n)
        level = crossed.to(flat.dtype) + (F - F.detach())
        return (self.s * (self.qmin + level)).reshape(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", min_interval={self.options.min_interval}"


class N2UQWeightOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    per_channel: bool = Field(True, description="α per output channel (the paper's code); False: one α per tensor")


class N2UQWeightQuantizer(FakeQuantizer):
    """N2UQ's entropy-preserving weight quantizer: W̃ = αΔ·(clamp(⌊W/(αΔ)⌋, l, u) + ½) with
    α = γ·mean|W| and Δ = 2/(2^b − 1): the 2^b levels are odd multiples of αΔ/2 on [−α, α]
    (the integer code q is on the signed grid, zero point −½)."""

    def __init__(self, bits: int, signed: bool | None = None, **options) -> None:
        if signed is False:
            raise ValueError("N2UQ's weight grid is symmetric about zero: signed must be True or None")
        super().__init__(bits, True)
        self.options = N2UQWeightOptions(**options)

    def alpha(self, W: torch.Tensor) -> torch.Tensor:
        gamma = (2**self.bits - 1) / 2 ** (self.bits - 1)
        W = W.detach()
        if self.options.per_channel and W.dim() > 1:
            mean_abs = W.abs().mean(dim=tuple(range(1, W.dim())), keepdim=True)
        else:
            mean_abs = W.abs().mean()
        return (gamma * mean_abs).clamp(min=torch.finfo(W.dtype).tiny)

    def quantize(self, W: torch.Tensor) -> torch.Tensor:
        step = self.alpha(W) * (2 / (2**self.bits - 1))
        q = torch.clamp(torch.floor(W.detach() / step), self.qmin, self.qmax)
        # Straight-through, ∂W̃/∂W = 1, written so that the forward value is exactly the level
        return step * (q + 0.5) + (W - W.detach())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", per_channel={self.options.per_channel}"
