"""GPTQ as a recipe stage: the wiring between the math in `gptq.py` and a model.

Block by block (`quantcore.calibration.run_blockwise`): the calibration samples run through
the block with a hook on every targeted Linear that adds its inputs to that layer's Hessian
H = 2XᵀX; then each Linear is quantized by GPTQ and swapped for a QuantizedLinear, and the
quantized block's outputs become the next block's inputs.
"""

from __future__ import annotations


import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from quantcore.algorithms.base import LayerResult, StageContext, replace_with_quantized
from quantcore.algorithms.gptq import GPTQ
from quantcore.calibration import find_blocks, observe_inputs, run_block, run_blockwise
from quantcore.recipe import Stage
from quantcore.registry import Algorithm, register
from quantcore.schemes import QuantType
from quantcore.targets import select_modules


class GPTQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    damp: float = Field(0.01, gt=0, le=1, description="dampening, as a fraction of the mean diagonal of H")
    block_size: int = Field(128, ge=1, le=4096, description="columns per lazy batch update")
    act_order: bool = Field(False, description="quantize columns in order of decreasing H_ii")
    static_groups: bool = Field(False, description="fix every group's S/Z from the weight before any update")


def check_stage(stage: Stage) -> None:
    assert stage.weights is not None
    if stage.weights.type != QuantType.INT:
        raise ValueError("weights.type: gptq quantizes to integer grids")
    if stage.activations is not None:
        raise ValueError("activations: gptq quantizes weights only; add a separate stage for activations")


def _inside(name: str, block_names: list[str]) -> bool:
    return any(name.startswith(b + ".") for b in block_names)


def apply(model: nn.Module, stage: Stage, context: StageContext) -> list[LayerResult]:
    assert stage.weights is not None
    options = GPTQOptions.model_validate(stage.options)
    if not context.calibration:
        raise ValueError("gptq needs calibration data: run it as a job, or pass calibration samples")
    targets = dict(select_modules(model, stage.targets, stage.ignore))
    block_names = [name for name, _ in find_blocks(model)]
    outside = [name for name in targets if not _inside(name, block_names)]
    if outside:
        raise ValueError(
            f"gptq quantizes the layers inside the model's blocks; {', '.join(outside)} lie outside: "
            "add them to 'ignore' or quantize them in an rtn stage"
        )
    scale_dtype = getattr(torch, stage.scale_dtype)
    results: list[LayerResult] = []

    def quantize_block(block_name: str, block: nn.Module, inputs) -> None:
        layers = {name: m for name, m in targets.items() if name.startswith(block_name + ".")}
        solvers = {name: GPTQ(m.in_features) for name, m in layers.items()}
        with torch.no_grad(), observe_inputs(layers, lambda name, x: solvers[name].add_batch(x)):
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
                run_block(block, hidden, kwargs)
        for name, linear in layers.items():
            result = solvers.pop(name).quantize(
                linear.weight.detach().float(),
                stage.weights,
                damp=options.damp,
                block_size=options.block_size,
                act_order=options.act_order,
                static_groups=options.static_groups,
                scale_dtype=scale_dtype,
            )
            layer = replace_with_quantized(model, name, linear, stage, qparams=result.qparams, weight=result.Q)
            layer.extra["gptq_loss"] = round(float(result.loss), 6)
            results.append(layer)

    run_blockwise(model, context.calibration, quantize_block, context.progress)
    return results


register(
    Algorithm(
        name="gptq",
        summary="GPTQ: Hessian-aware rounding with lazy batch updates (Frantar et al., 2022)",
        options=GPTQOptions,
        apply=apply,
        check_stage=check_stage,
        requires_calibration=True,
    )
)
