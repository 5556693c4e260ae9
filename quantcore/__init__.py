"""quantcore: the qforge quantization engine, usable with no server.

    from quantcore import quantize, load_quantized, Recipe
    report = quantize(model, "w4a16-rtn-g64")          # in place, returns per-layer results
    qm = load_quantized("path/to/artifact")             # rebuild a saved quantized model
"""

from __future__ import annotations

from typing import Any

from torch import nn

from quantcore.export import load_quantized
from quantcore.recipe import Recipe, list_presets, preset
from quantcore.schemes import Granularity, QuantScheme, QuantType

__all__ = ["Granularity", "QuantScheme", "QuantType", "Recipe", "list_presets", "load_quantized", "preset", "quantize"]


def quantize(
    model: nn.Module,
    recipe: Recipe | str | dict[str, Any],
    seed: int = 0,
    calibration: list | None = None,
    compute_dtype: str = "auto",
) -> list[dict]:
    """Apply every stage of `recipe` to `model` in place; returns the per-layer results.

    `calibration`: model inputs (token-id tensors or keyword dicts) for algorithms that need
    data, such as gptq; `compute_dtype` is that of their calibration forwards."""
    from quantcore import registry
    from quantcore.algorithms.base import StageContext

    recipe = Recipe.parse(recipe)
    results = []
    for stage in recipe.stages:
        results += registry.get(stage.algorithm).apply(
            model, stage, StageContext(calibration=calibration, seed=seed, compute_dtype=compute_dtype)
        )
    return [r.as_dict() for r in results]
