"""Recipes: which algorithm, at which bit width and granularity, on which layers.

A recipe is data (YAML or JSON) validated here, at the edge, and stored with the job
exactly as run. Unknown keys and impossible combinations are rejected with a message that
names the field.

    name: w4a16-rtn-g64
    stages:
      - algorithm: rtn
        targets: [Linear]
        ignore: [lm_head]
        weights: {type: int, bits: 4, symmetric: true, granularity: group, group_size: 64}
        activations: null
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quantcore.schemes import Granularity, QuantScheme, check_activation_scheme

SUPPORTED_TARGETS = ("Linear",)
MAX_STAGES = 8  # the presets use 1 or 2; each stage is a pass over the whole model
MAX_IGNORE = 256


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: str = Field(max_length=64, description="registered algorithm name, see quantcore.registry")
    targets: list[str] = Field(default_factory=lambda: ["Linear"], max_length=8, description="module types to quantize")
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        max_length=MAX_IGNORE,
        description="module-name patterns left in float: exact name, fnmatch glob, or 're:<regex>' (at most 3 "
        "repetitions, none nested)",
    )
    weights: QuantScheme | None = None
    activations: QuantScheme | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="algorithm-specific options")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="precision in which the artifact stores weight scales"
    )

    @field_validator("targets")
    @classmethod
    def _targets_known(cls, v: list[str]) -> list[str]:
        for t in v:
            if t not in SUPPORTED_TARGETS:
                raise ValueError(f"unsupported target '{t}'; supported: {', '.join(SUPPORTED_TARGETS)}")
        return v

    @field_validator("ignore")
    @classmethod
    def _patterns_cheap(cls, v: list[str]) -> list[str]:
        from quantcore.targets import check_pattern

        for index, pattern in enumerate(v):
            try:
                check_pattern(pattern)
            except ValueError as exc:
                raise ValueError(f"ignore[{index}]: {exc}") from None
        return v

    @field_validator("weights")
    @classmethod
    def _weights_static(cls, v: QuantScheme | None) -> QuantScheme | None:
        if v is not None:
            if v.dynamic:
                raise ValueError("weights are quantized once, ahead of time: dynamic must be false")
            if v.granularity == Granularity.TOKEN:
                raise ValueError("granularity 'token' is for activations; use tensor, channel or group for weights")
        return v

    @field_validator("activations")
    @classmethod
    def _activations_granularity(cls, v: QuantScheme | None) -> QuantScheme | None:
        if v is not None:
            check_activation_scheme(v)
        return v

    @model_validator(mode="after")
    def _algorithm_known(self) -> "Stage":
        # Imported here: the registry imports the algorithms, which import this module's types.
        from quantcore.registry import validate_stage

        validate_stage(self)
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("custom", max_length=128)
    stages: list[Stage] = Field(min_length=1, max_length=MAX_STAGES)

    @classmethod
    def parse(cls, value: "Recipe | str | dict[str, Any]") -> "Recipe":
        """A Recipe from a preset name, a YAML/JSON string, or a dict."""
        if isinstance(value, Recipe):
            return value
        if isinstance(value, str):
            if value in PRESETS:
                return preset(value)
            try:
                data = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ValueError(f"recipe is neither a preset name nor valid YAML/JSON: {exc}") from None
            if not isinstance(data, dict):
                raise ValueError(
                    f"unknown preset '{value}'; presets: {', '.join(sorted(PRESETS))}"
                    if isinstance(data, str)
                    else "a recipe must be a mapping with 'stages'"
                )
            value = data
        return cls.model_validate(value)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------
def _w(bits: int, granularity: str = "channel", group_size: int | None = None, symmetric: bool = True) -> dict:
    return {"type": "int", "bits": bits, "symmetric": symmetric, "granularity": granularity, "group_size": group_size}


_A8_TOKEN = {"type": "int", "bits": 8, "symmetric": True, "granularity": "token", "dynamic": True}
_A8_STATIC = {"type": "int", "bits": 8, "symmetric": True, "granularity": "tensor", "dynamic": False}
_A4_G64 = {"type": "int", "bits": 4, "symmetric": True, "granularity": "group", "group_size": 64, "dynamic": True}

PRESETS: dict[str, dict[str, Any]] = {
    "w8a16-rtn": {
        "description": "int8 weights per output channel, symmetric; activations stay in float",
        "stages": [{"algorithm": "rtn", "weights": _w(8)}],
    },
    "w8a8-rtn": {
        "description": "int8 per-channel weights and int8 per-token dynamic activations (runs int8 matmuls on CPU)",
        "stages": [{"algorithm": "rtn", "weights": _w(8), "activations": _A8_TOKEN}],
    },
    "w4a16-rtn": {
        "description": "int4 weights per output channel, symmetric",
        "stages": [{"algorithm": "rtn", "weights": _w(4)}],
    },
    "w4a16-rtn-g64": {
        "description": "int4 weights in groups of 64, symmetric",
        "stages": [{"algorithm": "rtn", "weights": _w(4, "group", 64)}],
    },
    "w4a16-rtn-g128": {
        "description": "int4 weights in groups of 128, symmetric",
        "stages": [{"algorithm": "rtn", "weights": _w(4, "group", 128)}],
    },
    "w4a16-rtn-g64-asym": {
        "description": "int4 weights in groups of 64, asymmetric (zero points)",
        "stages": [{"algorithm": "rtn", "weights": _w(4, "group", 64, symmetric=False)}],
    },
    "w3a16-rtn-g64": {
        "description": "int3 weights in groups of 64, symmetric",
        "stages": [{"algorithm": "rtn", "weights": _w(3, "group", 64)}],
    },
    "w4a16-gptq-g64": {
        "description": "GPTQ int4 weights in groups of 64, symmetric, act-order, calibrated on the benchmark split",
        # SmolLM2, 4096 eval tokens: 14.57 with act-order (32 windows), 17.10 without (16 windows)
        "stages": [{"algorithm": "gptq", "weights": _w(4, "group", 64), "options": {"act_order": True}}],
    },
    "w4a16-gptq-g32": {
        "description": "GPTQ int4 weights in groups of 32, symmetric, act-order: GGUF Q4_0's own grid (exported code for code)",
        "stages": [{"algorithm": "gptq", "weights": _w(4, "group", 32), "options": {"act_order": True}}],
    },
    "w3a16-gptq-g64": {
        "description": "GPTQ int3 weights in groups of 64, symmetric, act-order",
        "stages": [{"algorithm": "gptq", "weights": _w(3, "group", 64), "options": {"act_order": True}}],
    },
    "w4a16-octav-rtn-g64": {
        "description": "int4 weights in groups of 64, symmetric, each group clipped where OCTAV puts the least error",
        "stages": [{"algorithm": "rtn", "weights": {**_w(4, "group", 64), "observer": "octav"}}],
    },
    "w4a16-awq-g64": {
        # Zero points, as AWQ's reference implementation quantizes by default. SmolLM2, DESIGN.md
        # split: 13.18 with zero points, 15.09 symmetric (RTN: 15.45 and 16.96).
        "description": "AWQ int4 weights in groups of 64 with zero points: activation-aware scales folded into norms, "
        "clipping search",
        "stages": [{"algorithm": "awq", "weights": _w(4, "group", 64, symmetric=False)}],
    },
    "w4a16-best-g64": {
        # SmolLM2, DESIGN.md split: 12.49 (GPTQ act-order alone: 13.15 with zero points, 13.40
        # symmetric; RTN 15.45 / 16.96). AWQ's clipping before GPTQ made it worse (14.26,
        # symmetric): GPTQ then reproduces the clipped weights, not the model's, so only AWQ's
        # scales are kept.
        "description": "int4 group-64 with zero points: AWQ's activation-aware scales folded into norms, then GPTQ "
        "with act-order",
        "stages": [
            {"algorithm": "awq", "weights": _w(4, "group", 64, symmetric=False), "options": {"quantize": False, "clip": False}},
            {"algorithm": "gptq", "weights": _w(4, "group", 64, symmetric=False), "options": {"act_order": True}},
        ],
    },
    "w8a8-smoothquant": {
        "description": "SmoothQuant: outliers migrated into the weights (folded into norms), int8 per-channel weights, "
        "int8 per-token dynamic activations",
        "stages": [{"algorithm": "smoothquant", "weights": _w(8), "activations": _A8_TOKEN, "options": {"alpha": 0.5}}],
    },
    "w8a8-smoothquant-gptq": {
        # SmolLM2, DESIGN.md split: 11.92 (1.009x fp32) vs 11.94 with round-to-nearest weights.
        # Smoothing at alpha 0.5 moves activation outliers into the weights, where int8
        # round-to-nearest costs ~0.03 perplexity; GPTQ gives that back.
        "description": "SmoothQuant smoothing (alpha 0.5, folded into norms), then GPTQ int8 per-channel weights with "
        "act-order; int8 per-token dynamic activations",
        "stages": [
            {"algorithm": "smoothquant", "options": {"alpha": 0.5}},
            {"algorithm": "gptq", "weights": _w(8), "activations": _A8_TOKEN, "options": {"act_order": True}},
        ],
    },
    "w8a8-smoothquant-static": {
        "description": "SmoothQuant with int8 per-channel weights and int8 static per-tensor activations: each layer's "
        "input scale calibrated (max) on the smoothed model and stored in the artifact",
        "stages": [{"algorithm": "smoothquant", "weights": _w(8), "activations": _A8_STATIC, "options": {"alpha": 0.5}}],
    },
    "w4a4-svdquant-r32": {
        "description": "SVDQuant: smoothing, a rank-32 16-bit low-rank branch, int4 residual weights and int4 activations "
        "(groups of 64)",
        "stages": [
            {"algorithm": "svdquant", "weights": _w(4, "group", 64), "activations": _A4_G64, "options": {"rank": 32}}
        ],
    },
    "fp8-rtn": {
        "description": "fp8 e4m3 weights per output channel",
        "stages": [
            {
                "algorithm": "rtn",
                "weights": {"type": "fp8_e4m3", "bits": 8, "symmetric": True, "granularity": "channel"},
            }
        ],
    },
    "fp8-w8a8": {
        "description": "fp8 e4m3 weights per output channel and fp8 e4m3 dynamic per-token activations "
        "(compressed-tensors' FP8_DYNAMIC; the fp8 tensor-core kernel on GPUs of compute capability 8.9+)",
        "stages": [
            {
                "algorithm": "rtn",
                "weights": {"type": "fp8_e4m3", "bits": 8, "symmetric": True, "granularity": "channel"},
                "activations": {"type": "fp8_e4m3", "bits": 8, "symmetric": True, "granularity": "token", "dynamic": True},
            }
        ],
    },
}


def preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; presets: {', '.join(sorted(PRESETS))}")
    body = {k: v for k, v in PRESETS[name].items() if k != "description"}
    return Recipe.model_validate({"name": name, **body})


def list_presets() -> list[dict[str, Any]]:
    return [
        {"name": name, "description": spec["description"], "recipe": preset(name).model_dump(mode="json")}
        for name, spec in PRESETS.items()
    ]
