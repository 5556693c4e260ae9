"""AdaRound as a recipe stage: the wiring between the math in `adaround.py` and a transformer
(LLM or encoder), block by block (`quantcore.pipeline.run_blockwise`).

In each block the targeted Linears are taken in the order they run; each learns its rounding
on its inputs as the block now computes them (the layers before it already quantized), so
the rounding also absorbs the error that reaches it. With quantized activations the layer
sees its input quantized as it will be at run time (dynamic per token, or on the static grid
calibrated on the same inputs), and its rounding is learned against the float input's
output: ‖W x − W̃ x̂‖². A token sample of at most `max_rows` rows per layer is kept (seeded).

Weights on a per-tensor or per-channel grid (AdaRound's paper setting); the grid is the
stage's observer over W with S rounded to its storage dtype first (`adaround.weight_grid`),
so the codes written are the learned ones.
"""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field
from torch import nn

from quantcore.algorithms.adaround import AdaRoundOptions, adaround_layer, weight_grid
from quantcore.algorithms.base import LayerResult, StageContext, is_static, replace_with_quantized
from quantcore.algorithms.gptq_stage import calibrated_targets
from quantcore.modules.quantized_linear import fake_quant_activations
from quantcore.observers import make_observer
from quantcore.pipeline import BlockInputs, CalibrationBlock, run_blockwise
from quantcore.recipe import Stage
from quantcore.registry import Algorithm, register
from quantcore.schemes import Granularity, QuantType


class AdaRoundStageOptions(AdaRoundOptions):
    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(1000, ge=1, le=100_000)
    max_rows: int = Field(8192, ge=64, le=1_000_000, description="input rows (tokens) kept per layer")


def check_stage(stage: Stage) -> None:
    assert stage.weights is not None
    if stage.weights.type != QuantType.INT:
        raise ValueError(f"weights.type: {stage.algorithm} learns roundings on integer grids")
    if stage.weights.granularity not in (Granularity.TENSOR, Granularity.CHANNEL):
        raise ValueError(f"weights.granularity: {stage.algorithm} supports 'tensor' or 'channel' grids")


def _order_of_layers(block: CalibrationBlock, layers: dict[str, nn.Linear]) -> list[str]:
    """The block's target layers in the order they run, from one sample."""
    first = CalibrationBlock(block.name, block.module, BlockInputs(block.inputs.hidden[:1], block.inputs.kwargs[:1]),
                             block.compute_dtype)
    order: list[str] = []
    first.forward({name: (lambda x, name=name: order.append(name) if name not in order else None) for name in layers})
    return order


def _sample_inputs(block: CalibrationBlock, name: str, max_rows: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `max_rows` input rows of layer `name`, an equal random share from each sample."""
    per_call = max(1, -(-max_rows // len(block.inputs.hidden)))
    rows: list[torch.Tensor] = []

    def keep(x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        pick = torch.randperm(x.shape[0], generator=generator)[:per_call]
        rows.append(x[pick])

    block.forward({name: keep})
    return torch.cat(rows)[:max_rows]


def apply(model: nn.Module, stage: Stage, context: StageContext) -> list[LayerResult]:
    assert stage.weights is not None
    options = AdaRoundStageOptions.model_validate(stage.options)
    targets = calibrated_targets(model, stage, context)
    scale_dtype = getattr(torch, stage.scale_dtype)
    generator = torch.Generator().manual_seed(context.seed)
    results: list[LayerResult] = []

    def quantize_block(block: CalibrationBlock) -> None:
        layers = block.layers(targets)
        for name in _order_of_layers(block, layers):
            linear = layers[name]
            x = _sample_inputs(block, name, options.max_rows, generator)
            input_qparams = None
            x_hat = x
            if stage.activations is not None:
                if is_static(stage.activations):
                    observer = make_observer(stage.activations)
                    observer.update(x)
                    input_qparams = observer.qparams()
                x_hat = fake_quant_activations(x, stage.activations, input_qparams)
            qp, scale, zero_point = weight_grid(linear.weight.detach().float(), stage.weights, scale_dtype)
            result = adaround_layer(linear, x, x_hat, scale, zero_point, stage.weights.qmin, stage.weights.qmax,
                                    options, seed=context.seed + len(results))
            layer = replace_with_quantized(model, name, linear, stage, qparams=qp, weight=result.weight,
                                           input_qparams=input_qparams)
            layer.extra.update(adaround_loss_nearest=round(result.loss_nearest, 6),
                               adaround_loss=round(result.loss_learned, 6), adaround_flipped=round(result.flipped, 4))
            results.append(layer)

    run_blockwise(model, context.calibration, quantize_block, context.progress, context.compute_dtype, context.release_memory,
                  spill_dir=context.spill_dir)
    return results


register(
    Algorithm(
        name="adaround",
        summary="AdaRound: learned up/down rounding per layer on calibration data (Nagel et al., 2020)",
        options=AdaRoundStageOptions,
        apply=apply,
        check_stage=check_stage,
        requires_calibration=True,
    )
)
