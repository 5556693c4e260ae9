"""The GPU execution paths of `QuantizedLinear`: the Triton kernels of `quantcore.kernels`,
each tested against the reference forward it replaces.

    w4a16   weight-only int4 (group-wise or per channel, symmetric or with zero points):
            `kernels.w4a16` reads the packed codes and dequantizes in registers.
    w8a8    int8 per-channel symmetric weights x int8 dynamic per-token activations:
            `kernels.w8a8`, exact int32 sums, the scales in the epilogue.
    fp8     e4m3 per-channel weights x e4m3 dynamic per-token activations (the "fp8-w8a8"
            recipe): `kernels.fp8`, on GPUs with fp8 tensor cores (compute capability ≥ 8.9).
    w4a4_lowrank
            SVDQuant's `LowRankQuantizedLinear` (int4 group-wise weights and activations in the
            same groups, the low-rank branch): `kernels.w4a4_lowrank`, smoothing, activation
            quantization and the down-projection in one pass, the up-projection in the GEMM's
            epilogue (`choose_lowrank`).

Each path computes what the layer's reference computes (same codes, same scales), so it is
taken in "exact" mode too; float summation order is the only difference. A layer whose
schemes have no kernel keeps the reference. Which path a layer takes is decided once, from
its schemes and the device (`choose`). Triton is imported only when a path is chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from quantcore.kernels import triton_available
from quantcore.modules.cpu_paths import is_w4a16, is_w8a8_int  # the same schemes as the CPU paths take
from quantcore.schemes import Granularity, QuantType

if TYPE_CHECKING:
    from quantcore.modules.quantized_linear import QuantizedLinear


def _is_per_token(act) -> bool:
    return act.dynamic and act.symmetric and act.granularity == Granularity.TOKEN


def is_w8a8_int_per_token(layer: QuantizedLinear) -> bool:
    """int8 W8A8 with per-token activations (the Triton kernel's epilogue scales rows)."""
    return is_w8a8_int(layer) and layer.activation_scheme.granularity == Granularity.TOKEN


def is_fp8_w8a8(layer: QuantizedLinear) -> bool:
    weight, act = layer.weight_scheme, layer.activation_scheme
    return (
        act is not None
        and weight.type == QuantType.FP8_E4M3
        and weight.granularity in (Granularity.CHANNEL, Granularity.TENSOR)
        and act.type == QuantType.FP8_E4M3
        and _is_per_token(act)
    )


class GpuPath:
    """One Triton kernel bound to a layer: `path(x, layer)` is `layer.forward_reference(x)`."""

    def __init__(self, name: str, run: Callable[[torch.Tensor, "QuantizedLinear"], torch.Tensor]) -> None:
        self.name = name
        self._run = run

    def __call__(self, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        return self._run(x, layer)

    def __repr__(self) -> str:
        return f"GpuPath({self.name})"


def _w4a16(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    from quantcore.kernels.w4a16 import w4a16_matmul

    return w4a16_matmul(x, layer.qweight, layer.scale, layer.zero_point, layer.bias)


def _w8a8(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    from quantcore.kernels.w8a8 import w8a8_linear

    return w8a8_linear(x, layer.qweight, layer.scale, layer.bias)


def _fp8(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    from quantcore.kernels.fp8 import fp8_linear

    return fp8_linear(x, layer.qweight, layer.scale, layer.bias)


def is_w4a4_lowrank(layer) -> bool:
    weight, act = layer.weight_scheme, layer.activation_scheme
    return (
        act is not None
        and all(s.type == QuantType.INT and s.bits == 4 and s.symmetric and s.granularity == Granularity.GROUP for s in (weight, act))
        and act.dynamic
        and act.group_size == weight.group_size
        and weight.group_size >= 16
        and weight.group_size & (weight.group_size - 1) == 0  # the kernel's K step is one group: a power of two
    )


def _w4a4_lowrank(x: torch.Tensor, layer) -> torch.Tensor:
    from quantcore.kernels.w4a4_lowrank import lowrank_w4a4_linear

    return lowrank_w4a4_linear(x, layer)


def choose_lowrank(layer, device: torch.device) -> GpuPath | None:
    """The fused SVDQuant kernels for a `LowRankQuantizedLinear`, or None (its reference)."""
    return GpuPath("w4a4_lowrank", _w4a4_lowrank) if triton_available() and is_w4a4_lowrank(layer) else None


def choose(layer: QuantizedLinear, device: torch.device) -> GpuPath | None:
    """The Triton kernel for the layer's schemes on `device` (a CUDA device, or the CPU under
    TRITON_INTERPRET=1); None: the reference."""
    if not triton_available():
        return None
    if is_w4a16(layer):
        return GpuPath("w4a16", _w4a16)
    if is_w8a8_int_per_token(layer):
        return GpuPath("w8a8", _w8a8)
    if is_fp8_w8a8(layer):
        from quantcore.kernels.fp8 import fp8_supported

        return GpuPath("fp8", _fp8) if fp8_supported(device) else None
    return None
