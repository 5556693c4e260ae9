"""What every algorithm shares: the stage context it runs in and the per-layer result it
returns. The math of each algorithm lives in its own file beside this one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from quantcore.eval.layer_error import sqnr_db
from quantcore.modules.quantized_linear import QuantizedLinear
from quantcore.observers import make_observer
from quantcore.pipeline import forward_observed
from quantcore.qparams import QParams
from quantcore.recipe import Stage
from quantcore.schemes import QuantScheme
from quantcore.targets import set_module


@dataclass
class StageContext:
    """What the job hands an algorithm: progress reporting, calibration samples, the seed."""

    progress: Callable[[int, int, str], None] = lambda current, total, message="": None
    calibration: list[torch.Tensor] | None = None
    seed: int = 0
    compute_dtype: str = "auto"  # of calibration forwards: "auto", "float32" or "bfloat16"
    release_memory: bool = False  # drop replaced memory-mapped float weights (the job owns its model)
    # where a block-by-block pass moves the float weights it rewrote (and did not replace) block
    # by block, so a transforming stage ends holding one block of them, not the model's
    spill_dir: Path | None = None


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    weight_scheme: str
    activation_scheme: str | None
    sqnr_db: float
    float16_bytes: int
    quantized_bytes: int
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "weight_scheme": self.weight_scheme,
            "activation_scheme": self.activation_scheme,
            "sqnr_db": round(self.sqnr_db, 3),
            "float16_bytes": self.float16_bytes,
            "quantized_bytes": self.quantized_bytes,
            **self.extra,
        }


def replace_with_quantized(
    model: nn.Module,
    name: str,
    linear: nn.Linear,
    stage: Stage,
    qparams: QParams | None = None,
    weight: torch.Tensor | None = None,
    input_qparams: QParams | None = None,
) -> LayerResult:
    """Swap `linear` for a QuantizedLinear and measure the weight error against the original
    float weight. A static activation scheme needs the layer's calibrated `input_qparams`."""
    assert stage.weights is not None
    qlinear = QuantizedLinear.from_float(
        linear, stage.weights, stage.activations, qparams=qparams, weight=weight,
        scale_dtype=getattr(torch, stage.scale_dtype), input_qparams=input_qparams,
    )
    error = sqnr_db(linear.weight.detach().float(), qlinear.dequantize_weight())
    set_module(model, name, qlinear)
    return LayerResult(
        name=name,
        shape=(qlinear.out_features, qlinear.in_features),
        weight_scheme=stage.weights.short_name(),
        activation_scheme=stage.activations.short_name() if stage.activations else None,
        sqnr_db=error,
        float16_bytes=linear.weight.numel() * 2,
        quantized_bytes=qlinear.storage_bytes(),
    )


def is_static(activations: QuantScheme | None) -> bool:
    """Does this activation scheme need scales calibrated ahead of time?"""
    return activations is not None and not activations.dynamic


def calibrate_inputs(
    block: nn.Module, names: list[str], samples, scheme: QuantScheme, compute_dtype: torch.dtype
) -> dict[str, QParams]:
    """Static activation qparams for the layers `names` (relative to `block`): the scheme's
    observer folded over each layer's inputs as the block now computes them, on `samples`
    ((hidden, kwargs) pairs). One forward pass over the samples."""
    observers = {name: make_observer(scheme) for name in names}

    def observer(name: str):
        return lambda x: observers[name].update(x.reshape(-1, x.shape[-1]).float())

    forward_observed(block, samples, {name: observer(name) for name in names}, compute_dtype)
    return {name: obs.qparams() for name, obs in observers.items()}
