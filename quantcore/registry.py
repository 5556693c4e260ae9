"""Recipe algorithm names → algorithms, as torchao maps configs to handlers.

Each algorithm is registered with its pydantic options model (validated when a recipe is
parsed, so a typo in an option is a 4xx, not a failed job) and its `apply` function.
Names that the roadmap lists but this version does not implement are known here too, so a
recipe asking for one fails loudly at validation instead of silently running RTN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from quantcore.recipe import Stage


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    options: type[BaseModel]
    apply: Callable  # apply(model, stage, context) -> list[LayerResult]
    requires_weights: bool = True
    requires_calibration: bool = False  # the pipeline hands it calibration samples
    check_stage: Callable[["Stage"], None] | None = None  # raises ValueError naming the field


_REGISTRY: dict[str, Algorithm] = {}

# Known names that are not recipe stages (yet): rejected with a clear message saying where they are.
PLANNED = {"dfq": "it runs in classic ptq jobs on CNNs ({\"kind\": \"ptq\", \"ptq\": {\"method\": \"dfq\"}})"}


def register(algorithm: Algorithm) -> Algorithm:
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def _load_builtin() -> None:
    # Importing the modules registers them.
    from quantcore.algorithms import adaround_stage, awq, brecq_stage, gptq_stage, obq, octav, rtn, smoothquant, svdquant  # noqa: F401


def get(name: str) -> Algorithm:
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    available = ", ".join(sorted(_REGISTRY))
    if name in PLANNED:
        raise ValueError(f"algorithm '{name}' is not implemented as a recipe stage in this version of qforge: "
                         f"{PLANNED[name]}; available: {available}")
    raise ValueError(f"unknown algorithm '{name}'; available: {available}")


def available() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def validate_stage(stage: "Stage") -> None:
    algorithm = get(stage.algorithm)
    try:
        algorithm.options.model_validate(stage.options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"options.{where}: {first['msg']} (algorithm '{stage.algorithm}')") from None
    if algorithm.requires_weights and stage.weights is None:
        raise ValueError(f"algorithm '{stage.algorithm}' needs a 'weights' scheme")
    if algorithm.check_stage is not None:
        algorithm.check_stage(stage)
