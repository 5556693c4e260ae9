"""SmoothQuant: Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models" (ICML 2023).

Activations of LLMs have a few input channels with outliers 10-100x larger than the rest,
which a per-token int8 grid cannot hold without crushing everything else; weights are easy.
SmoothQuant migrates the difficulty from activations to weights, per input channel j:

    s_j = max|X_j|^α / max|W_j|^(1−α)             (max over calibration tokens / weight rows)
    X' = X diag(s)⁻¹,   W' = W diag(s)            (so X'W'ᵀ = XWᵀ exactly)

with the division folded into the preceding norm or linear (`smoothing.py`), so the
smoothed model has no extra op. α balances the two (0.5 in the paper; larger moves more
into the weights); `alpha: search` picks it from a grid on calibration data, either
(`search_scope: block`, the default) one α per block, by the error of the smoothed and
quantized block's output against the float block's, or (`search_scope: pair`) per
smoothing pair, by the output error of that pair's quantized consumers,
‖Q(X diag(s)⁻¹) Q(W diag(s))ᵀ − XWᵀ‖², on a sample of calibration tokens. On SmolLM2
W8A8 the per-pair choice, though finer, scored worse in perplexity (11.99) than one α per
block (11.94) or a fixed 0.5 (11.94): layer error is not what the model's loss sees.

Then, when the stage has a weight scheme, every targeted Linear of the block is quantized
round-to-nearest: W8A8 with per-channel weights and per-token dynamic activations runs
real int8 matmuls on CPU (`QuantizedLinear`). Static activations (`dynamic: false`,
per tensor) get their scale from the scheme's observer run over each layer's inputs in the
smoothed float block, on all calibration samples (the paper's static setting, O1-O3);
the pair-scope search scores each alpha with the min-max scale of its token sample instead. Without a weight scheme the stage only
smooths, for a later stage (e.g. GPTQ) to quantize.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.algorithms.base import LayerResult, StageContext, calibrate_inputs, is_static, replace_with_quantized
from quantcore.algorithms.gptq_stage import calibrated_targets
from quantcore.algorithms.smoothing import SmoothingPair, migration_scales, smoothing_pairs
from quantcore.modules.quantized_linear import QuantizedLinear, fake_quant_activations
from quantcore.observers import fake_quant_weight, make_observer
from quantcore.pipeline import CalibrationBlock, compute_copy, run_block, run_blockwise
from quantcore.qparams import QParams
from quantcore.recipe import Stage
from quantcore.registry import Algorithm, register
from quantcore.targets import set_module


class SmoothQuantOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float | Literal["search"] = Field(0.5, description="migration strength in [0, 1], or 'search' per block")
    alpha_grid: list[float] = Field(
        default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], min_length=1, max_length=21,
        description="the alphas tried by alpha: search",
    )
    search_scope: Literal["pair", "block"] = Field(
        "block", description="alpha: search picks one alpha per smoothing pair (layer outputs) or per block (block output)"
    )
    search_samples: int = Field(16, ge=1, le=512, description="calibration samples scored per alpha (block scope)")
    search_tokens: int = Field(4096, ge=16, le=65536, description="calibration tokens scored per alpha (pair scope)")


def check_stage(stage: Stage) -> None:
    options = SmoothQuantOptions.model_validate(stage.options)
    for alpha in [options.alpha] if isinstance(options.alpha, float) else options.alpha_grid:
        if not 0 <= alpha <= 1:
            raise ValueError(f"options.alpha: must be in [0, 1], got {alpha}")
    if options.alpha == "search" and stage.weights is None:
        raise ValueError("options.alpha: 'search' scores the quantized block, so it needs a 'weights' scheme")
    act = stage.activations
    if act is not None and stage.weights is None:
        raise ValueError("activations: quantizing activations needs a 'weights' scheme in the same stage")


def activation_absmax(
    block: CalibrationBlock, pairs: list[SmoothingPair], sample_tokens: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """max_t |X_tj| of each pair's input over all calibration tokens (one forward), and, with
    `sample_tokens`, about that many of its input rows, spread evenly over every sample."""
    seen: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {}
    per_sample = -(-sample_tokens // max(len(block.inputs.hidden), 1)) if sample_tokens else 0

    def observer(name: str):
        def observe(x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1])
            m = x.abs().amax(dim=0).float()
            seen[name] = m if name not in seen else torch.maximum(seen[name], m)
            if per_sample:
                pick = torch.linspace(0, x.shape[0] - 1, min(per_sample, x.shape[0])).round().long()
                rows.setdefault(name, []).append(x[pick].float())

        return observe

    block.forward({pair.consumer_names[0]: observer(pair.consumer_names[0]) for pair in pairs})
    absmax = {pair.producer_name: seen[pair.consumer_names[0]] for pair in pairs}
    sample = {pair.producer_name: torch.cat(rows[pair.consumer_names[0]]) for pair in pairs if per_sample}
    return absmax, sample


def pair_scales(pair: SmoothingPair, absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """The migration scales of a pair, one per producer channel."""
    return migration_scales(pair.to_producer(absmax), pair.to_producer(pair.weight_absmax()), alpha)


def search_pair_alpha(
    pair: SmoothingPair, absmax: torch.Tensor, X: torch.Tensor, stage: Stage, grid: list[float]
) -> tuple[float, dict[str, float]]:
    """The alpha of the grid whose smoothed, quantized consumers best reproduce X Wᵀ on the rows X."""
    weights = [c.weight.detach().float() for c in pair.consumers]
    expected = [X @ W.T for W in weights]
    act_max, weight_max = pair.to_producer(absmax), pair.to_producer(pair.weight_absmax())
    errors = {}
    for alpha in grid:
        wide = pair.to_consumer(migration_scales(act_max, weight_max, alpha))
        Xs = X / wide
        if stage.activations is not None:
            Xs = fake_quant_activations(Xs, stage.activations)
        errors[str(alpha)] = sum(
            float((Xs @ fake_quant_weight(W * wide, stage.weights).T - want).pow(2).sum()) for W, want in zip(weights, expected)
        ) / X.shape[0]
    best = min(errors, key=errors.get)
    return float(best), errors


def smooth(pairs: list[SmoothingPair], absmax: dict[str, torch.Tensor], alpha: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Fold each pair's scales (one alpha, or one per producer name) into the model."""
    scales = {}
    for pair in pairs:
        a = alpha[pair.producer_name] if isinstance(alpha, dict) else alpha
        scales[pair.producer_name] = pair_scales(pair, absmax[pair.producer_name], a)
        pair.apply(scales[pair.producer_name])
    return scales


def _quantize_copy(module: nn.Module, names: list[str], stage: Stage, inputs: dict[str, QParams]) -> None:
    """Round-to-nearest quantize `names` (relative to `module`) in place, as the stage would;
    `inputs` holds their static activation qparams, if the scheme has them."""
    for name in names:
        linear = module.get_submodule(name)
        observer = make_observer(stage.weights)
        observer.update(linear.weight.detach().float())
        qlinear = QuantizedLinear.from_float(
            linear, stage.weights, stage.activations, observer.qparams(), getattr(torch, stage.scale_dtype),
            input_qparams=inputs.get(name),
        )
        set_module(module, name, qlinear)


def search_alpha(block: CalibrationBlock, layers: list[str], absmax: dict, stage: Stage, options: SmoothQuantOptions) -> tuple[float, dict]:
    """The alpha of the grid whose smoothed, quantized block is closest to the float block."""
    samples = list(zip(block.inputs.hidden, block.inputs.kwargs))[: options.search_samples]
    relative = [name[len(block.name) + 1 :] for name in layers]
    with torch.no_grad():
        reference = compute_copy(block.module, block.compute_dtype)
        expected = [run_block(reference, h, kw).float() for h, kw in samples]
        errors = {}
        for alpha in options.alpha_grid:
            candidate = copy.deepcopy(block.module)
            smooth(smoothing_pairs(block.name, candidate, set(layers), grouped=True), absmax, alpha)
            inputs = {}
            if is_static(stage.activations):  # the static scales this alpha's smoothing would get
                inputs = calibrate_inputs(candidate, relative, samples, stage.activations, block.compute_dtype)
            _quantize_copy(candidate, relative, stage, inputs)
            work = compute_copy(candidate, block.compute_dtype)
            errors[alpha] = sum(
                float((run_block(work, h, kw).float() - want).pow(2).mean()) for (h, kw), want in zip(samples, expected)
            )
    best = min(errors, key=errors.get)
    return best, {str(a): e / len(samples) for a, e in errors.items()}


def apply(model: nn.Module, stage: Stage, context: StageContext) -> list[LayerResult]:
    options = SmoothQuantOptions.model_validate(stage.options)
    targets = calibrated_targets(model, stage, context)
    results: list[LayerResult] = []
    smoothed: list[str] = []

    def quantize_block(block: CalibrationBlock) -> None:
        layers = block.layers(targets)
        pairs = smoothing_pairs(block.name, block.module, layers, grouped=True)
        alpha, errors, per_pair = options.alpha, None, False
        alphas: dict[str, float] = {}  # consumer name -> its pair's alpha
        first_consumer = {pair.consumer_names[0]: pair.producer_name for pair in pairs}
        if pairs:
            per_pair = alpha == "search" and options.search_scope == "pair"
            absmax, sample = activation_absmax(block, pairs, options.search_tokens if per_pair else 0)
            if per_pair:
                alpha, errors = {}, {}
                for pair in pairs:
                    alpha[pair.producer_name], errors[pair.producer_name] = search_pair_alpha(
                        pair, absmax[pair.producer_name], sample.pop(pair.producer_name), stage, options.alpha_grid
                    )
            elif alpha == "search":
                alpha, errors = search_alpha(block, list(layers), absmax, stage, options)
            smooth(pairs, absmax, alpha)
            for pair in pairs:
                alphas.update({name: alpha[pair.producer_name] if isinstance(alpha, dict) else alpha for name in pair.consumer_names})
            smoothed.extend(alphas)
        if stage.weights is None:
            return
        inputs = {}
        if is_static(stage.activations):  # calibrated on the smoothed float block, as the paper's static mode
            relative = {name: name[len(block.name) + 1 :] for name in layers}
            samples = zip(block.inputs.hidden, block.inputs.kwargs)
            calibrated = calibrate_inputs(block.module, list(relative.values()), samples, stage.activations, block.compute_dtype)
            inputs = {name: calibrated[rel] for name, rel in relative.items()}
        for name, linear in layers.items():
            observer = make_observer(stage.weights)
            observer.update(linear.weight.detach().float())
            layer = replace_with_quantized(model, name, linear, stage, qparams=observer.qparams(), input_qparams=inputs.get(name))
            layer.extra["smoothquant_alpha"] = alphas.get(name)
            if errors and per_pair:
                if name in first_consumer:  # each pair's search, reported once, on its first layer
                    layer.extra["smoothquant_alpha_search"] = errors[first_consumer[name]]
            elif errors and name == next(iter(layers)):
                layer.extra["smoothquant_alpha_search"] = errors
            results.append(layer)

    run_blockwise(model, context.calibration, quantize_block, context.progress, context.compute_dtype, context.release_memory,
                  spill_dir=context.spill_dir)
    if not smoothed:
        raise ValueError(
            "smoothquant found no layer it can smooth: it folds scales into a preceding norm or linear "
            "(llama-style input_layernorm → q/k/v, post_attention_layernorm → gate/up, up → down; BERT value → output)"
        )
    return results


register(
    Algorithm(
        name="smoothquant",
        summary="SmoothQuant: migrate activation outliers into the weights, folded into norms (Xiao et al., 2023)",
        options=SmoothQuantOptions,
        apply=apply,
        check_stage=check_stage,
        requires_weights=False,
        requires_calibration=True,
    )
)
