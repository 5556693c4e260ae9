"""Quantization-friendly float training: losses added to the task loss that shape the weights.

A uniform quantizer spends its 2^b levels on [min W, max W]; a few outliers stretch that range
and leave the bulk of the weights on a handful of levels. These regularizers, added during
float training or fine-tuning, keep the weight distributions compact before quantization.

R² (range regularization): Kundu, Yoo, Mishra, Cho, Adya (Apple), "R²: Range Regularization
for Model Compression and Quantization", arXiv 2303.08253, 2023 (later versions: "R2 Loss:
Range Restriction Loss for Model Compression and Quantization"). Per layer weight W:

    L∞      R(W) = max |W|                                            (3.1)
    margin  R(W) = |M|² + Σ_i max(|w_i| − |M|, 0),   M learnable      (3.2)
    SMM     R(W) = (s-max(W, α) − s-min(W, α))² + η e^{−α},  α learnable   (3.3)
            s-max(W, α) = Σ_i w_i e^{α w_i} / Σ_j e^{α w_j},   s-min = s-max(W, −α)

KURE: Shkolnik, Chmiel, Banner, Shomron, Nahshan, Bronstein, Weiser, "Robust Quantization:
One Model to Rule Them All" (NeurIPS 2020). A uniform distribution (kurtosis 1.8) is more
robust to quantization noise than a Gaussian (3):

    Kurt[W] = E[((w − μ)/σ)⁴],    L_KURE = (1/L) Σ_l (Kurt[W_l] − K_T)²,   K_T = 1.8

The total loss is L_task + λ·L_reg (λ = `strength`). KURE's 1/L average is its paper's; R²
writes R per layer, and here the layers' terms are summed (as are the margin's hinge terms
over a layer's weights), so a larger model is not regularized more weakly per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
from torch import nn

Kind = Literal["linf", "margin", "soft_min_max", "kure"]
KINDS: tuple[str, ...] = get_args(Kind)
UNIFORM_KURTOSIS = 1.8  # E[x⁴]/E[x²]² of U(−a, a) = (a⁴/5)/(a²/3)² = 9/5
Weights = Sequence[torch.Tensor] | Sequence[tuple[str, torch.Tensor]]


def weight_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weights of the model's Conv1d/Conv2d/Linear layers, in module order (the layers the
    papers regularize; norms and embeddings are left alone)."""
    return [(name, m.weight) for name, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def _tensors(weights: Weights) -> list[torch.Tensor]:
    tensors = [w[1] if isinstance(w, tuple) else w for w in weights]
    if not tensors:
        raise ValueError("no weight tensors to regularize")
    if any(w.numel() == 0 for w in tensors):
        raise ValueError("an empty weight tensor cannot be regularized")
    return tensors


def _per_layer(values: torch.Tensor | Sequence[float], count: int, what: str) -> torch.Tensor:
    values = torch.as_tensor(values)
    if values.shape != (count,):
        raise ValueError(f"expected one {what} per layer ({count}), got shape {tuple(values.shape)}")
    return values


def linf_loss(weights: Weights) -> torch.Tensor:
    """R² L∞ (§3.1): Σ_l max|W_l|. Its gradient reaches only the largest-magnitude weight(s) of
    each layer, so it trims outliers and leaves the bulk of the distribution untouched."""
    return torch.stack([w.abs().amax() for w in _tensors(weights)]).sum()


def margin_loss(weights: Weights, margins: torch.Tensor) -> torch.Tensor:
    """R² margin (§3.2): Σ_l [ |M_l|² + Σ_i max(|w_i| − |M_l|, 0) ].

    Every weight outside ±|M_l| is pulled in (not just the single largest, as with L∞), and
    the |M|² term shrinks the margin itself, so the allowed range tightens while training."""
    tensors = _tensors(weights)
    margins = _per_layer(margins, len(tensors), "margin")
    terms = [m.abs() ** 2 + torch.relu(w.abs() - m.abs()).sum() for w, m in zip(tensors, margins)]
    return torch.stack(terms).sum()


def soft_max(w: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """s-max(W, α) = Σ_i w_i e^{α w_i} / Σ_j e^{α w_j}: → max W as α → ∞, → mean W as α → 0.
    (softmax subtracts the largest exponent, so large α·w does not overflow.)"""
    w = w.flatten()
    return (w * torch.softmax(alpha * w, dim=0)).sum()


def soft_min_max_loss(weights: Weights, alphas: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
    """R² soft-min-max (§3.3): Σ_l [ (s-max(W_l, α_l) − s-min(W_l, α_l))² + η e^{−α_l} ].

    Unlike L∞ and margin, which bound |w| symmetrically, this shrinks the span between the
    (soft) extremes wherever it sits, so an asymmetric range (for asymmetric quantizers or
    clustering) is allowed. Every weight gets a gradient weighted by how extreme it is. The
    range term alone would drive α → 0 (all soft extremes collapse to the mean); η e^{−α}
    pushes α up, so s-min/s-max stay close to the true extremes."""
    tensors = _tensors(weights)
    alphas = _per_layer(alphas, len(tensors), "temperature")
    terms = [(soft_max(w, a) - soft_max(w, -a)) ** 2 + eta * torch.exp(-a) for w, a in zip(tensors, alphas)]
    return torch.stack(terms).sum()


def kurtosis(w: torch.Tensor) -> torch.Tensor:
    """Kurt[W] = E[((w − μ)/σ)⁴] with the population σ (Pearson's kurtosis, 3 for a Gaussian)."""
    w = w.flatten()
    z = (w - w.mean()) / w.std(correction=0)
    return (z**4).mean()


def kure_loss(weights: Weights, target: float = UNIFORM_KURTOSIS) -> torch.Tensor:
    """KURE: (1/L) Σ_l (Kurt[W_l] − K_T)², K_T = 1.8 by default (a uniform distribution)."""
    tensors = _tensors(weights)
    if any(w.numel() < 2 for w in tensors):
        raise ValueError("kurtosis needs at least two weights per tensor")
    return torch.stack([(kurtosis(w) - target) ** 2 for w in tensors]).mean()


class MarginRange(nn.Module):
    """The learnable margins M_l of the R² margin loss, one per layer. Each starts at the layer's
    range max|W_l| (the loss starts at Σ|M|², with no weight outside), and the |M|² term then
    pulls it, and with it the weights beyond it, inward."""

    def __init__(self, weights: Weights) -> None:
        super().__init__()
        tensors = _tensors(weights)
        self.margins = nn.Parameter(torch.stack([w.detach().abs().amax() for w in tensors]).float())

    def forward(self, weights: Weights) -> torch.Tensor:
        return margin_loss(weights, self.margins)


class SoftMinMaxRange(nn.Module):
    """The learnable temperatures α_l of the R² soft-min-max loss, one per layer. α multiplies
    raw weights, so its useful scale is 1/|W|: each starts at `sharpness` / max|W_l|, where the
    soft extremes are already near the hard ones (our choice; the paper learns α from there)."""

    def __init__(self, weights: Weights, eta: float = 1.0, sharpness: float = 10.0) -> None:
        super().__init__()
        if eta < 0 or sharpness <= 0:
            raise ValueError(f"eta must be >= 0 and sharpness > 0, got {eta}, {sharpness}")
        tensors = _tensors(weights)
        self.eta = eta
        ranges = torch.stack([w.detach().abs().amax().clamp_min(1e-8) for w in tensors]).float()
        self.alphas = nn.Parameter(sharpness / ranges)

    def forward(self, weights: Weights) -> torch.Tensor:
        return soft_min_max_loss(weights, self.alphas, self.eta)


class RangeRegularizer(nn.Module):
    """strength × the chosen loss over the model's current Conv/Linear weights.

    Its own parameters (margins or temperatures; none for linf and kure) are in .parameters();
    add them to the optimizer next to the model's. The model is held outside the module tree,
    so the model's parameters are not listed twice."""

    def __init__(self, model: nn.Module, kind: Kind, strength: float) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown regularizer kind {kind!r}; expected one of {KINDS}")
        if not math.isfinite(strength) or strength < 0:
            raise ValueError(f"strength must be a finite number >= 0, got {strength}")
        weights = weight_tensors(model)
        if not weights:
            raise ValueError("the model has no Conv1d, Conv2d or Linear layers to regularize")
        self.kind, self.strength, self._model = kind, float(strength), (model,)  # tuple: not a submodule
        self.layer_names = [name for name, _ in weights]
        self.ranges: nn.Module | None = None
        if kind == "margin":
            self.ranges = MarginRange(weights)
        elif kind == "soft_min_max":
            self.ranges = SoftMinMaxRange(weights)

    def loss(self) -> torch.Tensor:
        """The unweighted loss over the model's weights as they are now."""
        weights = weight_tensors(self._model[0])
        if [name for name, _ in weights] != self.layer_names:
            raise ValueError("the model's Conv/Linear layers changed since the regularizer was built")
        if self.kind == "linf":
            return linf_loss(weights)
        if self.kind == "kure":
            return kure_loss(weights)
        return self.ranges(weights)

    def forward(self) -> torch.Tensor:
        return self.strength * self.loss()


def regularized_finetune(
    model: nn.Module,
    batches: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    kind: Kind,
    strength: float,
    epochs: int,
    learning_rate: float,
    seed: int,
    progress: Callable[[int, dict], None] | None = None,
    batch_size: int = 64,
) -> list[dict]:
    """Fine-tune the float model in place on loss_fn(model(x), y) + strength · R(W), with Adam.

    `batches` is (x, y); each epoch walks it in a fresh shuffled order (a torch.Generator seeded
    with `seed`, so the run is reproducible and the global RNG is left alone) in minibatches of
    `batch_size`. After each epoch `progress(epoch, record)` is called (epochs count from 1);
    the records {"epoch", "task_loss", "regularizer"} (per-sample mean task loss; mean of the
    weighted regularizer term over the epoch's steps) are returned."""
    if not (isinstance(batches, tuple) and len(batches) == 2 and all(isinstance(t, torch.Tensor) for t in batches)):
        raise ValueError("batches must be a tuple (x, y) of tensors")
    x, y = batches
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must be non-empty and of the same length, got {len(x)} and {len(y)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    regularizer = RangeRegularizer(model, kind, strength)
    optimizer = torch.optim.Adam([*model.parameters(), *regularizer.parameters()], lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    records = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        task_total, reg_total, steps = 0.0, 0.0, 0
        for i in range(0, len(order), batch_size):
            index = order[i : i + batch_size]
            task = loss_fn(model(x[index]), y[index])
            reg = regularizer()
            optimizer.zero_grad()
            (task + reg).backward()
            optimizer.step()
            task_total += task.item() * len(index)
            reg_total += reg.item()
            steps += 1
        record = {"epoch": epoch, "task_loss": task_total / len(x), "regularizer": reg_total / steps}
        records.append(record)
        if progress is not None:
            progress(epoch, record)
    return records
