"""AdaRound: Nagel, Amjad, van Baalen, Louizos, Blankevoort, "Up or Down? Adaptive Rounding for
Post-Training Quantization" (ICML 2020).

Rounding each weight to nearest is not what minimises a layer's output error: the errors of
a row's weights add up in its outputs. AdaRound learns, per weight, whether to round down or
up, on calibration data, with the grid (S, Z) fixed:

    W̃ = S · (clamp(⌊W/S⌋ + h(V) + Z, l, u) − Z)
    h(V) = clamp(σ(V)(ζ − γ) + γ, 0, 1)            (rectified sigmoid, ζ = 1.1, γ = −0.1)
    min_V ‖W x − W̃ x̂‖² + λ Σ (1 − |2h(V) − 1|^β)    (eq. 21-25)

x are the layer's inputs in the float model and x̂ in the model with the layers before it
already quantized (the paper's asymmetric reconstruction), so the rounding also makes up for
the error that reaches the layer. The regulariser pushes every h(V) to 0 or 1; β is annealed
from 20 to 2 after a warm-up without it. V starts where h(V) equals the weight's fractional
part (so the soft weight starts at W), and at the end rounding is up where h(V) ≥ 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.observers import make_observer
from quantcore.pipeline import run_observed
from quantcore.qparams import QParams

ZETA, GAMMA = 1.1, -0.1


class AdaRoundOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(2000, ge=1, le=100_000)
    learning_rate: float = Field(1e-2, gt=0)
    regularization: float = Field(0.01, ge=0, description="λ, the weight of the rounding regulariser")
    beta_start: float = Field(20.0, gt=0)
    beta_end: float = Field(2.0, gt=0)
    warmup: float = Field(0.2, ge=0, lt=1, description="share of the iterations without the regulariser")
    batch_rows: int = Field(1024, ge=1, le=1_048_576, description="output rows (tokens or pixels) per step")


@dataclass
class AdaRoundResult:
    weight: torch.Tensor  # W̃, on the grid
    loss_nearest: float  # ‖W x − W̃ x̂‖² per output row (token, pixel) with round-to-nearest
    loss_learned: float  # the same with the learned rounding (never above loss_nearest)
    flipped: float  # share of weights rounded away from nearest


def rectified_sigmoid(V: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _initial_V(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) = rest (the fractional part of W/S), inverting the rectified sigmoid."""
    rest = rest.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


class LearnedRounding(nn.Module):
    """The rounding of one weight W on a fixed grid (S, Z, [l, u]), learned through V."""

    def __init__(self, W: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: float, qmax: float) -> None:
        super().__init__()
        # The grid is fixed: only V learns (and nothing here may hold on to a caller's graph)
        W, scale, zero_point = W.detach(), scale.detach(), zero_point.detach()
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax
        self.floor = torch.floor(W / scale)
        self.nearest_codes = torch.round(W / scale)
        self.zero_free = not bool(zero_point.any())
        self.V = nn.Parameter(_initial_V(W / scale - self.floor))

    @classmethod
    def on_grid(cls, W: torch.Tensor, scheme, scale_dtype: torch.dtype = torch.float32) -> "LearnedRounding":
        """The rounding of W on `scheme`'s grid (`weight_grid`); `.qparams` is that grid."""
        qparams, scale, zero_point = weight_grid(W, scheme, scale_dtype)
        rounding = cls(W, scale, zero_point, scheme.qmin, scheme.qmax)
        rounding.qparams = qparams
        return rounding

    def _on_grid(self, codes: torch.Tensor) -> torch.Tensor:
        if self.zero_free:  # symmetric grids: two elementwise passes fewer per step
            return self.scale * codes.clamp(self.qmin, self.qmax)
        return self.scale * ((codes + self.zero_point).clamp(self.qmin, self.qmax) - self.zero_point)

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.V)

    def soft(self, h: torch.Tensor | None = None) -> torch.Tensor:
        """W̃ with h(V) in [0, 1]: what the optimisation sees (pass this step's h to reuse it)."""
        return self._on_grid(self.floor + (self.h() if h is None else h))

    def hard(self) -> torch.Tensor:
        """W̃ rounded up where h(V) ≥ 0.5 (V ≥ 0)."""
        return self._on_grid(self.floor + (self.V >= 0).float()).detach()

    def nearest(self) -> torch.Tensor:
        return self._on_grid(self.nearest_codes)

    def regularizer(self, beta: float, h: torch.Tensor | None = None) -> torch.Tensor:
        """Σ (1 − |2h(V) − 1|^β): zero only when every h(V) is 0 or 1."""
        h = self.h() if h is None else h
        return (1 - (2 * h - 1).abs().pow(beta)).sum()


def annealed_beta(step: int, options: AdaRoundOptions) -> float | None:
    """β at `step`: None during the warm-up (no regulariser), then cosine from β_start to β_end."""
    warmup = int(options.warmup * options.iterations)
    if step < warmup:
        return None
    progress = (step - warmup) / max(1, options.iterations - warmup)
    return options.beta_end + 0.5 * (options.beta_start - options.beta_end) * (1 + math.cos(math.pi * progress))


def learn_roundings(roundings: dict[str, LearnedRounding], error: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                    options: AdaRoundOptions) -> None:
    """Adam on every V: error(the soft weights, by key; it draws its own batch) plus
    λ Σ (1 − |2h(V) − 1|^β) once the warm-up is over, β annealed (eq. 21-25)."""
    optimizer = torch.optim.Adam([r.V for r in roundings.values()], lr=options.learning_rate)
    for step in range(options.iterations):
        h = {key: r.h() for key, r in roundings.items()}  # once per step: the soft weight and the regulariser share it
        loss = error({key: r.soft(h[key]) for key, r in roundings.items()})
        beta = annealed_beta(step, options)
        if beta is not None:
            loss = loss + options.regularization * sum(r.regularizer(beta, h[key]) for key, r in roundings.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def harden(roundings: dict[str, LearnedRounding], total_error: Callable[[dict[str, torch.Tensor]], Any]
           ) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(error with nearest rounding, error with the learned one, the weights to keep) on all
    the data: hard rounding can, rarely, land worse than nearest, and then nearest is kept."""
    nearest = {key: r.nearest() for key, r in roundings.items()}
    learned = {key: r.hard() for key, r in roundings.items()}
    loss_nearest, loss_learned = float(total_error(nearest)), float(total_error(learned))
    chosen = learned if loss_learned <= loss_nearest else nearest
    return loss_nearest, min(loss_nearest, loss_learned), chosen


class _LayerOp:
    """y = layer(x) with a given weight, for Linear (rows = tokens) and Conv (rows = pixels)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        bias = None if layer.bias is None else layer.bias.detach()  # fixed: no gradient to compute or leave behind
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        return layer._conv_forward(x, weight, bias)


def adaround_layer(
    layer: nn.Module,
    inputs_float: torch.Tensor,
    inputs_quantized: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: float,
    qmax: float,
    options: AdaRoundOptions | None = None,
    seed: int = 0,
) -> AdaRoundResult:
    """Learn the rounding of `layer`'s weight on its grid (S, Z broadcastable to the weight)."""
    options = options or AdaRoundOptions()
    op = _LayerOp(layer)
    W = layer.weight.detach().float()
    with torch.no_grad():
        target = op(inputs_float, W)
    rounding = LearnedRounding(W, scale, zero_point, qmin, qmax)
    generator = torch.Generator().manual_seed(seed)
    samples = inputs_quantized.shape[0]
    rows_per_sample = target[0].numel() // target.shape[1]  # output positions: 1 for a Linear on vectors
    batch = max(1, min(samples, options.batch_rows // rows_per_sample))

    def batch_error(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        index = torch.randint(0, samples, (batch,), generator=generator)
        # Squared error summed over output channels, averaged over output rows (tokens, pixels)
        return (op(inputs_quantized[index], weights["W"]) - target[index]).pow(2).sum() / (batch * rows_per_sample)

    def total_error(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return (op(inputs_quantized, weights["W"]) - target).pow(2).sum() / (samples * rows_per_sample)

    learn_roundings({"W": rounding}, batch_error, options)
    loss_nearest, loss_learned, chosen = harden({"W": rounding}, total_error)
    flipped = float((chosen["W"] != rounding.nearest()).float().mean())
    return AdaRoundResult(weight=chosen["W"], loss_nearest=loss_nearest, loss_learned=loss_learned, flipped=flipped)


def weight_grid(W: torch.Tensor, scheme, scale_dtype: torch.dtype = torch.float32
                ) -> tuple[QParams, torch.Tensor, torch.Tensor]:
    """`scheme`'s observer over W (a conv's weight seen as its (out, in·kh·kw) matrix), with S
    rounded to `scale_dtype` (the precision it is stored in, so the codes are chosen against
    the stored S): the QParams, and S and Z shaped to broadcast against W."""
    observer = make_observer(scheme)
    observer.update(W.reshape(W.shape[0], -1))
    qp = observer.qparams()
    qp = QParams(scale=qp.scale.to(scale_dtype).float(), zero_point=qp.zero_point, scheme=scheme)
    shape = (-1,) + (1,) * (W.dim() - 1) if qp.scale.numel() > 1 else (1,) * W.dim()
    return qp, qp.scale.reshape(shape), qp.zero_point.reshape(shape)


def capture_inputs(model: nn.Module, names: list[str], data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs of the named layers when `model` runs `data`, concatenated over batches; the
    dict lists the layers in the order they first run."""
    seen: dict[str, list[torch.Tensor]] = {}
    run_observed(model, names, data, lambda name, x: seen.setdefault(name, []).append(x))
    return {name: torch.cat(xs) for name, xs in seen.items()}


def adaround_model(model: nn.Module, scheme, data: list[torch.Tensor], options: AdaRoundOptions | None = None,
                   seed: int = 0, per_layer: dict | None = None, progress=None) -> dict[str, AdaRoundResult]:
    """AdaRound every conv/linear of `model` in place, in the order they run, on `scheme`'s grid
    (its observer over each weight, a conv's weight seen as its (out, in·kh·kw) matrix). Each
    layer learns its rounding on the inputs of the model quantized so far, against the float
    model's outputs. `per_layer` maps layer names to their own scheme (e.g. the first and last
    layer at 8 bits). `progress(done, total, message)` is called after each layer."""
    names = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    float_inputs = capture_inputs(model, names, data)
    results = {}
    for index, name in enumerate(list(float_inputs)):
        layer = model.get_submodule(name)
        layer_scheme = (per_layer or {}).get(name, scheme)
        _, scale, zero = weight_grid(layer.weight.detach().float(), layer_scheme)
        quantized_inputs = capture_inputs(model, [name], data)[name]
        results[name] = adaround_layer(layer, float_inputs.pop(name), quantized_inputs, scale, zero,
                                       layer_scheme.qmin, layer_scheme.qmax, options, seed + index)
        with torch.no_grad():
            layer.weight.copy_(results[name].weight)
        if progress is not None:
            progress(index + 1, len(names), f"layer {index + 1}/{len(names)}: {name}")
    return results

