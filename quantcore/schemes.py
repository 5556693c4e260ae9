"""Quantization schemes: what a tensor is quantized to, described as data.

A `QuantScheme` says *how* a tensor is mapped onto a grid (integer bits or an fp8 format,
symmetric or asymmetric, at what granularity, statically or per call). It carries no
numbers; the numbers (scale S, zero point Z) are `quantcore.qparams.QParams`.

Integer grids follow the usual affine convention  q = clamp(round(x / S) + Z, l, u),
x̂ = (q - Z) · S, with

* symmetric  (signed):   l = -2^(b-1), u = 2^(b-1) - 1, Z = 0, S = max|x| / u
* asymmetric (unsigned): l = 0,        u = 2^b - 1,     Z = round(-min / S), S = (max - min) / u
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class QuantType(str, Enum):
    INT = "int"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"


class Granularity(str, Enum):
    TENSOR = "tensor"  # one S/Z for the whole tensor
    CHANNEL = "channel"  # one per output channel (dim 0 of a weight)
    GROUP = "group"  # one per `group_size` consecutive inputs of each output channel
    TOKEN = "token"  # one per row of an activation (all dims but the last); dynamic only


FP8_DTYPES = {
    QuantType.FP8_E4M3: torch.float8_e4m3fn,
    QuantType.FP8_E5M2: torch.float8_e5m2,
}

# Wider groups than any real layer's inputs; a whole row is granularity 'channel'.
MAX_GROUP_SIZE = 8192

ObserverName = Literal["minmax", "moving_average", "percentile", "histogram", "mse", "octav"]


class QuantScheme(BaseModel):
    """How one tensor (a weight or an activation) is quantized."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    type: QuantType = QuantType.INT
    bits: int = Field(8, description="integer bits, 2..8 (8 for fp8)")
    symmetric: bool = True
    granularity: Granularity = Granularity.CHANNEL
    group_size: int | None = Field(
        None, le=MAX_GROUP_SIZE, description=f"inputs per group, 1..{MAX_GROUP_SIZE}; only with granularity=group"
    )
    dynamic: bool = Field(False, description="compute S/Z from each tensor at run time")
    observer: ObserverName = "minmax"

    @model_validator(mode="after")
    def _check(self) -> "QuantScheme":
        if self.type == QuantType.INT:
            if not 2 <= self.bits <= 8:
                raise ValueError(f"bits must be between 2 and 8 for integer quantization, got {self.bits}")
        else:
            if self.bits != 8:
                raise ValueError(f"bits must be 8 for {self.type.value}, got {self.bits}")
            if not self.symmetric:
                raise ValueError(f"{self.type.value} is a sign-magnitude format: symmetric must be true")
        if self.granularity == Granularity.GROUP:
            if self.group_size is None or self.group_size < 1:
                raise ValueError("group_size must be a positive integer when granularity is 'group'")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only valid with granularity 'group', not '{self.granularity.value}'")
        if self.granularity == Granularity.TOKEN and not self.dynamic:
            raise ValueError("granularity 'token' is computed per call: set dynamic: true")
        return self

    # --- the grid -------------------------------------------------------------------------
    @property
    def is_fp8(self) -> bool:
        return self.type != QuantType.INT

    @property
    def qmin(self) -> float:
        if self.is_fp8:
            return -self.qmax
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> float:
        if self.is_fp8:
            return float(torch.finfo(FP8_DTYPES[self.type]).max)
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        if self.is_fp8:
            return FP8_DTYPES[self.type]
        return torch.int8 if self.symmetric else torch.uint8

    def short_name(self) -> str:
        kind = f"int{self.bits}" if not self.is_fp8 else self.type.value
        side = "sym" if self.symmetric else "asym"
        gran = f"g{self.group_size}" if self.granularity == Granularity.GROUP else self.granularity.value
        return f"{kind}-{side}-{gran}" + ("-dyn" if self.dynamic else "")


def check_activation_scheme(scheme: QuantScheme) -> None:
    """Static (calibrated) activation scales are one per tensor: a layer's input has no fixed
    rows to give their own S, and per-input-channel S belongs to smoothing, not to the grid."""
    if not scheme.dynamic and scheme.granularity != Granularity.TENSOR:
        raise ValueError(
            f"static activation quantization is per tensor: use granularity 'tensor' with dynamic: false, "
            f"or dynamic: true for '{scheme.granularity.value}'"
        )
