"""AWQ: Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration" (MLSys 2024).

Weights that meet large activations matter most. Rather than keeping them in higher
precision, AWQ scales them up before quantization (so their relative rounding error
shrinks) and scales the activations down by the same factor, per input channel j:

    s_j = mean|X_j|^α / mean|Ŵ_j|^(1−α),  normalised by sqrt(max s · min s)
    W' = W diag(s),  X' = X diag(s)⁻¹    (folded into the preceding norm or linear, `smoothing.py`)

with Ŵ the weights divided by their group's max|W| (the weight term is the reference
implementation's `duo_scaling`, its default; `duo_scaling: false` gives the paper's
s_j = mean|X_j|^α).

α is searched on a grid in [0, 1) per (producer, consumers) pair, minimising the
consumers' output error on calibration data. Then each layer's clipping range is searched:
per group, the largest |w| shrunk by r on a grid in [min_ratio, 1], keeping the r of least
output error; weights are clamped to it, and the stage quantizes round-to-nearest (or,
with `quantize: false`, leaves the scaled and clipped float weights to a later stage such as
GPTQ).

Output error without re-running the layers: for a layer with inputs X and a weight change
ΔW, ‖X ΔWᵀ‖² = tr(ΔW XᵀX ΔWᵀ), so one pass accumulating H = XᵀX (GPTQ's Hessian, shared by
layers fed the same tensor) scores every candidate on all calibration tokens. The clip
search, like the paper's, scores each group alone: e_g H_gg e_gᵀ with H_gg the group's
diagonal block. Scaling by s turns H into diag(s)⁻¹ H diag(s)⁻¹ for the layers after it.

Measured on SmolLM2-135M W4 g64 (bench/RESULTS.md): zero points matter more to AWQ than to
RTN (asymmetric 13.18 vs symmetric 15.09; RTN 15.45 vs 16.96), which is why the preset
quantizes asymmetrically as the reference implementation does; scoring α on the holding
module's output (`search_scope: module`) did worse than the layers' own error (13.24, 15.31).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.algorithms.base import LayerResult, StageContext, replace_with_quantized
from quantcore.algorithms.gptq_stage import accumulate_hessians, calibrated_targets
from quantcore.algorithms.smoothing import SmoothingPair, smoothing_pairs
from quantcore.observers import fake_quant_weight, make_observer
from quantcore.pipeline import CalibrationBlock, run_block, run_blockwise
from quantcore.qparams import fake_quant, qparams_from_range
from quantcore.recipe import Stage
from quantcore.registry import Algorithm, register
from quantcore.schemes import Granularity, QuantScheme, QuantType


class AWQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grid: int = Field(20, ge=1, le=100, description="alphas tried: 0, 1/grid, ..., (grid-1)/grid")
    duo_scaling: bool = Field(True, description="divide by mean|Ŵ_j|^(1−α), the group-normalised weight magnitude")
    clip: bool = Field(True, description="search each group's clipping range")
    clip_grid: int = Field(20, ge=1, le=100, description="clip ratios tried between min_clip_ratio and 1")
    min_clip_ratio: float = Field(0.5, gt=0, lt=1)
    clip_exclude: list[str] = Field(
        default_factory=lambda: ["*q_proj", "*k_proj", "*.query", "*.key"],
        max_length=64,
        description="layers whose range is not clipped (their outputs meet in QKᵀ, which per-group error does not see)",
    )
    quantize: bool = Field(True, description="quantize here (round-to-nearest); false leaves it to a later stage")
    search_scope: Literal["layers", "module"] = Field(
        "layers",
        description="score alpha by the consumers' own output error, or (module) by the output of the module holding "
        "them all (attention for q/k/v, the MLP for gate/up), as the reference implementation does",
    )
    search_samples: int = Field(8, ge=1, le=512, description="calibration samples the module scope runs per alpha")


def check_stage(stage: Stage) -> None:
    assert stage.weights is not None
    if stage.weights.type != QuantType.INT:
        raise ValueError("weights.type: awq searches integer grids")
    if stage.activations is not None:
        raise ValueError("activations: awq is weight-only; use smoothquant or svdquant for activations")


class _Inputs:
    """H = XᵀX-based error of a layer, and the mean |x_j| AWQ's scales are made of."""

    def __init__(self, hessian: torch.Tensor, absmean: torch.Tensor) -> None:
        self.H, self.absmean = hessian, absmean

    def output_error(self, dW: torch.Tensor) -> torch.Tensor:
        return ((dW @ self.H) * dW).sum()

    def rescale(self, s: torch.Tensor) -> None:
        self.H = self.H / s[:, None] / s[None, :]
        self.absmean = self.absmean / s


def normalised_weight_absmean(weights: list[torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """mean_i |W_ij| / max|W| of (i, j)'s quantization group, over the rows of every weight."""
    W = torch.cat(weights)
    group = scheme.group_size if scheme.granularity == Granularity.GROUP else W.shape[1]
    if scheme.granularity == Granularity.TENSOR:
        return (W.abs() / W.abs().max().clamp(min=1e-6)).mean(dim=0)
    grouped = W.abs().reshape(W.shape[0], -1, group)
    return (grouped / grouped.amax(dim=-1, keepdim=True).clamp(min=1e-6)).reshape(W.shape).mean(dim=0)


def search_scale(
    pair: SmoothingPair, inputs: _Inputs, scheme: QuantScheme, grid: int, duo_scaling: bool = True
) -> tuple[torch.Tensor, float, float]:
    """The s of least output error over the pair's consumers; returns (s, α, error)."""
    weights = [c.weight.detach().float() for c in pair.consumers]
    w_mean = normalised_weight_absmean(weights, scheme) if duo_scaling else None

    def error(s: torch.Tensor) -> float:
        return sum(float(inputs.output_error(W - fake_quant_weight(W * s, scheme) / s)) for W in weights)

    return _best_alpha(inputs.absmean, w_mean, grid, pair.channels, error)


class _ModuleSamples:
    """The inputs and float outputs of one module of a block on a few calibration samples, to
    score candidate weights of the layers inside it by the module's output error."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.calls: list[tuple[tuple, dict[str, Any]]] = []
        self.outputs: list[torch.Tensor] = []

    def record(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        self.calls.append((args, kwargs))
        self.outputs.append(_first(output).detach())

    def error(self) -> float:
        with torch.no_grad():
            return sum(float((_first(self.module(*a, **kw)) - out).pow(2).sum()) for (a, kw), out in zip(self.calls, self.outputs))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def capture_modules(block: CalibrationBlock, pairs: list[SmoothingPair], samples: int) -> dict[str, _ModuleSamples]:
    """For each pair with several consumers, the innermost module of the block holding them
    all (e.g. self_attn for q/k/v), run on the first `samples` calibration samples."""
    captured: dict[str, _ModuleSamples] = {}  # by module name, relative to the block
    holder: dict[str, str] = {}  # producer name -> the module holding its consumers
    for pair in pairs:
        if len(pair.consumers) < 2:
            continue  # one consumer: its own output is the module's, scored exactly through H
        common = _common_prefix([name[len(block.name) + 1 :] for name in pair.consumer_names])
        if not common:
            continue
        if common not in captured:
            captured[common] = _ModuleSamples(block.module.get_submodule(common))
        holder[pair.producer_name] = common
    handles = [c.module.register_forward_hook(c.record, with_kwargs=True) for c in captured.values()]
    try:
        with torch.no_grad():
            for hidden, kwargs in list(zip(block.inputs.hidden, block.inputs.kwargs))[:samples]:
                run_block(block.module, hidden.to(next(block.module.parameters()).dtype), kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {producer: captured[common] for producer, common in holder.items()}


def _common_prefix(names: list[str]) -> str:
    parts = [name.split(".") for name in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        common.append(pieces[0])
    return ".".join(common[: min(len(p) for p in parts) - 1])


def search_scale_on_module(
    pair: SmoothingPair, module: _ModuleSamples, absmean: torch.Tensor, scheme: QuantScheme, grid: int, duo_scaling: bool = True
) -> tuple[torch.Tensor, float, float]:
    """As `search_scale`, scoring each s by the holding module's output with every consumer's
    weight replaced by Q(W diag(s)) diag(s)⁻¹ (the scaled, quantized layer seen from its
    unscaled input) and the module's other layers left in float."""
    originals = [c.weight.detach().clone() for c in pair.consumers]
    weights = [W.float() for W in originals]
    w_mean = normalised_weight_absmean(weights, scheme) if duo_scaling else None

    def error(s: torch.Tensor) -> float:
        with torch.no_grad():
            for consumer, W in zip(pair.consumers, weights):
                consumer.weight.copy_((fake_quant_weight(W * s, scheme) / s).to(consumer.weight.dtype))
        return module.error()

    try:
        return _best_alpha(absmean, w_mean, grid, pair.channels, error)
    finally:
        with torch.no_grad():
            for consumer, W in zip(pair.consumers, originals):
                consumer.weight.copy_(W)


def _best_alpha(
    absmean: torch.Tensor, w_mean: torch.Tensor | None, grid: int, channels: int, error: Callable[[torch.Tensor], float]
) -> tuple[torch.Tensor, float, float]:
    """The candidate s of least `error(s)` over α = 0, 1/grid, ...: (s, α, error)."""
    best = (torch.ones(channels), 0.0, float("inf"))
    for step in range(grid):
        alpha = step / grid
        s = _candidate(absmean, w_mean, alpha)
        e = error(s)
        if e < best[2]:
            best = (s, alpha, e)
    return best


def _candidate(absmean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    s = absmean.clamp(min=1e-4).pow(alpha)
    if w_mean is not None:
        s = (s / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_clip(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, grid: int, min_ratio: float) -> torch.Tensor:
    """W clamped, per quantization group, to the shrunk range of least output error."""
    if scheme.granularity == Granularity.TENSOR:
        return W  # one range for the whole tensor: not searched per group
    rows, columns = W.shape
    group = scheme.group_size if scheme.granularity == Granularity.GROUP else columns
    Wg = W.reshape(rows, columns // group, group)
    # H's diagonal blocks, one per group: (G, group, group)
    Hg = torch.stack([H[i : i + group, i : i + group] for i in range(0, columns, group)])
    lo, hi = Wg.amin(dim=-1, keepdim=True), Wg.amax(dim=-1, keepdim=True)
    row_scheme = scheme.model_copy(update={"granularity": Granularity.CHANNEL, "group_size": None})
    best_error = torch.full((rows, columns // group, 1), float("inf"))
    best_ratio = torch.ones_like(best_error)
    for step in range(grid + 1):
        ratio = 1 - (1 - min_ratio) * step / grid
        qp = qparams_from_range((lo * ratio).reshape(-1, 1), (hi * ratio).reshape(-1, 1), row_scheme)
        e = (Wg.reshape(-1, group) - fake_quant(Wg.reshape(-1, group), qp)).reshape(Wg.shape)
        error = torch.einsum("rgi,gij,rgj->rg", e, Hg, e).unsqueeze(-1)
        better = error < best_error
        best_error, best_ratio = torch.where(better, error, best_error), torch.where(better, ratio, best_ratio)
    clipped = torch.maximum(torch.minimum(Wg, hi * best_ratio), lo * best_ratio)
    return clipped.reshape(rows, columns)


def apply(model: nn.Module, stage: Stage, context: StageContext) -> list[LayerResult]:
    assert stage.weights is not None
    options = AWQOptions.model_validate(stage.options)
    targets = calibrated_targets(model, stage, context)
    results: list[LayerResult] = []

    def quantize_block(block: CalibrationBlock) -> None:
        layers = block.layers(targets)
        absmean: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def also(name: str, x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).float()
            absmean[name] = absmean.get(name, 0) + x.abs().sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        solvers = accumulate_hessians(block, layers, also=also)
        # One _Inputs per distinct input tensor: layers sharing a Hessian share it.
        shared: dict[int, _Inputs] = {}
        inputs: dict[str, _Inputs] = {}
        for name, solver in solvers.items():
            if id(solver) not in shared:
                owner = next(n for n in absmean if solvers[n] is solver)
                shared[id(solver)] = _Inputs(solver.H, absmean[owner] / counts[owner])
            inputs[name] = shared[id(solver)]

        alphas = {}
        pairs = smoothing_pairs(block.name, block.module, set(layers))
        modules = capture_modules(block, pairs, options.search_samples) if options.search_scope == "module" else {}
        for pair in pairs:
            if pair.producer_name in modules:
                s, alpha, _ = search_scale_on_module(
                    pair, modules[pair.producer_name], inputs[pair.consumer_names[0]].absmean, stage.weights, options.grid, options.duo_scaling
                )
            else:
                s, alpha, _ = search_scale(pair, inputs[pair.consumer_names[0]], stage.weights, options.grid, options.duo_scaling)
            pair.apply(s)
            inputs[pair.consumer_names[0]].rescale(s)
            alphas.update({name: alpha for name in pair.consumer_names})

        for name, linear in layers.items():
            clip = options.clip and not any(fnmatch.fnmatchcase(name, p) for p in options.clip_exclude)
            if clip:
                W = search_clip(linear.weight.detach().float(), inputs[name].H, stage.weights, options.clip_grid, options.min_clip_ratio)
                with torch.no_grad():
                    linear.weight.copy_(W.to(linear.weight.dtype))
            if options.quantize:
                observer = make_observer(stage.weights)
                observer.update(linear.weight.detach().float())
                layer = replace_with_quantized(model, name, linear, stage, qparams=observer.qparams())
                layer.extra.update({"awq_alpha": alphas.get(name), "awq_clipped": clip})
                results.append(layer)

    run_blockwise(model, context.calibration, quantize_block, context.progress, context.compute_dtype, context.release_memory,
                  spill_dir=context.spill_dir)
    return results


register(
    Algorithm(
        name="awq",
        summary="AWQ: activation-aware per-channel scaling and clipping search (Lin et al., 2024)",
        options=AWQOptions,
        apply=apply,
        check_stage=check_stage,
        requires_calibration=True,
    )
)
