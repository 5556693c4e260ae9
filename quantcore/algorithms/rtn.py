"""Round-to-nearest (RTN) weight quantization.

The baseline every other algorithm is measured against: each targeted weight W is mapped
independently to q = clamp(round(W / S) + Z, l, u) with S and Z from the stage's observer
(min-max unless the recipe names another), per tensor, per output channel or per group.
No calibration data is needed. With an int8 per-token activation scheme the layer runs as
W8A8 (int8 matmuls on CPU); other activation schemes are fake-quantized per call.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import nn

from quantcore.algorithms.base import LayerResult, StageContext, replace_with_quantized
from quantcore.memory import release_replaced
from quantcore.observers import make_observer
from quantcore.recipe import Stage
from quantcore.registry import Algorithm, register
from quantcore.schemes import Granularity
from quantcore.targets import select_modules


class RTNOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_stage(stage: Stage) -> None:
    act = stage.activations
    if act is None:
        return
    if not act.dynamic:
        raise ValueError("activations: rtn quantizes activations per call; set dynamic: true (static needs calibration)")
    if act.granularity == Granularity.CHANNEL:
        raise ValueError("activations.granularity: 'channel' is not supported; use token, group (within each token) or tensor")


def apply(model: nn.Module, stage: Stage, context: StageContext) -> list[LayerResult]:
    assert stage.weights is not None
    layers = select_modules(model, stage.targets, stage.ignore)
    results = []
    for i, (name, linear) in enumerate(layers):
        observer = make_observer(stage.weights)
        observer.update(linear.weight.detach().float())
        results.append(replace_with_quantized(model, name, linear, stage, qparams=observer.qparams()))
        if context.release_memory:
            # a memory-mapped float weight read for this layer would otherwise stay resident
            # until the job ends: the whole model's worth by the last layer
            release_replaced(model, [linear.weight])
        context.progress(i + 1, len(layers), name)
    return results


register(Algorithm(name="rtn", summary="round-to-nearest weights", options=RTNOptions, apply=apply, check_stage=check_stage))
