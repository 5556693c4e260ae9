"""The CPU execution paths of `QuantizedLinear`, each held to its reference forward.

    int8   W8A8: int8 per-channel symmetric weights × int8 dynamic activations (per token or
           per tensor), multiplied in int8 by oneDNN on CPUs with AMX (measured 2.5-3x
           faster than fbgemm there at 512 rows; the codes, the op and the per-token
           scaling in one C++ call) and by PyTorch's fbgemm on the others.
           oneDNN (AMX): int8 codes round(x / S_x) against the int8 weight, int32 sums,
           Σ q_x·q_w·S_w in fp32, times S_x: exact as below.
           exact (CPUs with VNNI): each token is divided by its own scale S_x = max|x|/127
           and rounded first, so fbgemm's static input quantization with scale 1 and zero
           point 128 stores exactly the reference codes round(x / S_x) + 128; it sums the int8
           products in int32 (VNNI's vpdpbusd does not saturate) and returns
           Σ q_x·q_w·S_w in fp32, which we multiply by S_x: the reference's numbers up to
           float rounding.
           approximate (CPUs without VNNI; only when asked for): their u8·s8 pair sums
           saturate in int16, so fbgemm's dynamic op runs with 7-bit activations
           (reduce_range) on the same per-token-normalized input.
    int4   weight-only int4 (group-wise or per channel, symmetric or with zero points): the
           C++ kernel of `quantcore.kernels.cpu` for decode-sized inputs (at most
           MAX_ROWS rows), which reads the packed codes and never forms Ŵ; larger inputs
           (prefill) dequantize Ŵ a block of rows at a time, each block one BLAS matmul.

Which path a layer takes is decided once, from its schemes and this CPU (`choose`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from quantcore.kernels.cpu import cpu_flags
from quantcore.schemes import Granularity, QuantType

if TYPE_CHECKING:
    from quantcore.modules.quantized_linear import QuantizedLinear


def has_vnni() -> bool:
    """int8 dot products accumulated in int32 without saturation (AVX-512 VNNI or AVX-VNNI)."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def has_amx_int8() -> bool:
    return "amx_int8" in cpu_flags()


def onednn_int8_available() -> bool:
    """oneDNN's int8 linear (the one torch.compile's quantization uses) on a CPU with AMX."""
    return has_amx_int8() and torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


def is_w8a8_int(layer: QuantizedLinear) -> bool:
    weight, act = layer.weight_scheme, layer.activation_scheme
    return (
        act is not None
        and weight.type == QuantType.INT
        and weight.bits == 8
        and weight.symmetric
        and weight.granularity in (Granularity.CHANNEL, Granularity.TENSOR)
        and act.type == QuantType.INT
        and act.bits == 8
        and act.symmetric
        and act.dynamic
        and act.granularity in (Granularity.TOKEN, Granularity.TENSOR)
    )


def is_w4a16(layer: QuantizedLinear) -> bool:
    weight = layer.weight_scheme
    if layer.activation_scheme is not None or weight.type != QuantType.INT or weight.bits != 4:
        return False
    group = weight.group_size if weight.granularity == Granularity.GROUP else layer.in_features
    return weight.granularity in (Granularity.GROUP, Granularity.CHANNEL) and group % 2 == 0 and layer.in_features % 2 == 0


_NO_BIAS = torch.empty(0)  # the C++ functions' "no bias"


class Int8Path:
    name = "int8"

    def __init__(self, layer: QuantizedLinear, exact: bool, use_kernels: bool = True, engine: str | None = None) -> None:
        """`engine`: "onednn" or "fbgemm" (None: oneDNN where it runs on AMX and the C++ steps
        are available, fbgemm otherwise)."""
        from quantcore.kernels import cpu as cpu_kernels

        self.exact = exact
        # the per-token steps in C++, bound once (at decode sizes Python's own overhead shows)
        module = cpu_kernels.load() if use_kernels and exact and cpu_kernels.available() else None
        self.row_codes = module.int8_row_codes if module is not None else None
        self.scale_rows = module.scale_rows_add_bias if module is not None else None
        self.per_token = layer.activation_scheme.granularity == Granularity.TOKEN
        self.bias = None if layer.bias is None else layer.bias.float()
        self.out_features = layer.out_features
        if engine is None:
            engine = "onednn" if module is not None and onednn_int8_available() else "fbgemm"
        if engine == "onednn" and module is None:
            raise ValueError("the oneDNN engine runs through the C++ kernels: they need exact=True and use_kernels=True")
        self.engine = engine
        if self.engine == "onednn":
            self.onednn_linear = module.int8_linear_onednn
            self.packed = torch.ops.onednn.qlinear_prepack(layer.qweight.contiguous(), None)
            self.w_scale = layer.scale.float().reshape(-1).expand(layer.out_features).contiguous()
            self.w_zero = torch.zeros(layer.out_features, dtype=torch.int32)
            self.bias_or_none = self.bias.contiguous() if self.bias is not None else _NO_BIAS
            return
        scale = layer.scale.double().reshape(-1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # quantized-tensor creation is "deprecated" but is the op's API
            if scale.numel() > 1:
                zeros = torch.zeros(layer.out_features, dtype=torch.long)
                weight = torch._make_per_channel_quantized_tensor(layer.qweight, scale, zeros, 0)
            else:
                weight = torch._make_per_tensor_quantized_tensor(layer.qweight, float(scale[0]), 0)
            self.packed = torch.ops.quantized.linear_prepack(weight, None)

    def __call__(self, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        # In place wherever possible: at decode sizes these element-wise steps cost as much
        # as the int8 matmul itself.
        if self.engine == "onednn":  # one C++ call does it all: shapes, dtype, codes, matmul, scaling
            return self.onednn_linear(x, self.packed, self.w_scale, self.w_zero, self.bias_or_none, self.per_token)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        if self.row_codes is not None:  # the steps below in two C++ passes
            codes, s_x = self.row_codes(x2.contiguous(), self.per_token)
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes, 1.0, 128, self.packed)
            self.scale_rows(y, s_x, self.bias if self.bias is not None else _NO_BIAS)
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        dim = -1 if self.per_token else None
        s_x = torch.linalg.vector_norm(x2, float("inf"), dim=dim, keepdim=True).div_(127)
        s_x.masked_fill_(s_x == 0, 1.0)  # S_x as the reference computes it (an all-zero token gets S = 1)
        if self.exact:
            # Rounded here, as the reference rounds: fbgemm adds the zero point before rounding,
            # in float, which moves values within 1e-6 of a half step to the other side.
            codes = torch.div(x2, s_x).round_()
            y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes, 1.0, 128, self.packed)
        else:
            y = torch.ops.quantized.linear_dynamic(torch.div(x2, s_x * 127), self.packed, True).mul_(127)
        y.mul_(s_x)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


PREFILL_BLOCK_ROWS = 256  # output rows of Ŵ dequantized at once: 4 MB of fp32 at K = 4096


class Int4Path:
    name = "int4"

    def __init__(self, layer: QuantizedLinear) -> None:
        from quantcore.kernels import cpu as cpu_kernels
        from quantcore.kernels.reference import INT4_SYMMETRIC_ZERO, int4_group_params

        scales, zeros, _ = int4_group_params(layer.scale, layer.zero_point, layer.out_features, layer.in_features)
        self.scales = scales.float().contiguous()
        # Z' is the stored code of 0.0: Z with zero points, 8 on the symmetric grid
        self.zeros = zeros.float().contiguous() if zeros is not None else torch.full_like(self.scales, INT4_SYMMETRIC_ZERO)
        self.bias = layer.bias.float().contiguous() if layer.bias is not None else _NO_BIAS
        self.max_rows = cpu_kernels.MAX_ROWS
        module = cpu_kernels.load()  # bound once: at decode sizes Python's own overhead shows
        self.gemv, self.blocked = module.w4a16_gemv, module.w4a16_blocked

    def __call__(self, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        if x2.shape[0] > self.max_rows:  # prefill: Ŵ a block of rows at a time, each block BLAS
            y = self.blocked(x2, layer.qweight, self.scales, self.zeros, self.bias, PREFILL_BLOCK_ROWS)
        else:
            y = self.gemv(x2, layer.qweight, self.scales, self.zeros, self.bias)
        y = y.reshape(*shape[:-1], layer.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)


def choose(layer: QuantizedLinear, approximate: bool = False) -> Int8Path | Int4Path | None:
    """The fastest path this CPU has for the layer's schemes; None: the reference.
    `approximate` also allows paths that do not reproduce the reference's numbers."""
    if is_w8a8_int(layer) and fbgemm_available():
        if has_vnni():
            return Int8Path(layer, exact=True)
        return Int8Path(layer, exact=False) if approximate else None
    if is_w4a16(layer):
        from quantcore.kernels import cpu as cpu_kernels

        return Int4Path(layer) if cpu_kernels.available() else None
    return None

