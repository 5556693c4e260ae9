"""Quantization parameters (scale S, zero point Z, bounds l/u) and the four maps on them.

    quantize      q  = clamp(round(x / S) + Z, l, u)          (integer grids)
                  q  = fp8(clamp(x / S, -u, u))               (fp8 grids, Z = 0)
    dequantize    x̂  = (q - Z) · S
    fake_quant    x̂  = dequantize(quantize(x))                (stays in float)
    requantize    q' = quantize(dequantize(q; S, Z); S', Z')

Granularity is expressed by a *grouped view* of the tensor: the tensor is reshaped so that
one (S, Z) pair covers exactly the last dimension of the view, and S/Z are kept with that
dimension reduced to 1 so they broadcast. `grouped_view` / `ungroup` convert back and forth.

Worked example (../shared/seeds, int4): for w = [0.1, 0.2, 1.2, 3, 2.1, -2.1, -3.5]
symmetric gives S = 3.5/7 = 0.5 and q = [0, 0, 2, 6, 4, -4, -7];
asymmetric gives S = 6.5/15, Z = 8 and q = [8, 8, 11, 15, 13, 3, 0].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantcore.schemes import FP8_DTYPES, Granularity, QuantScheme


class QuantizationError(ValueError):
    """A tensor cannot be quantized with the requested scheme (for example a group size
    that does not divide the dimension). The message names the problem."""


# --------------------------------------------------------------------------------------
# grouped view
# --------------------------------------------------------------------------------------
def grouped_view(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Reshape `x` so that each (S, Z) pair covers the last dimension of the result."""
    g = scheme.granularity
    if g == Granularity.TENSOR:
        return x.reshape(1, -1)
    if x.dim() == 0:
        raise QuantizationError(f"granularity '{g.value}' needs a tensor with at least one dimension")
    if g == Granularity.CHANNEL:
        return x.reshape(x.shape[0], -1)
    if g == Granularity.TOKEN:
        return x.reshape(-1, x.shape[-1])
    # GROUP: consecutive `group_size` inputs of each output channel (dim 0)
    rows = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(1, -1)
    k, gs = rows.shape[1], scheme.group_size
    assert gs is not None
    if k % gs != 0:
        raise QuantizationError(
            f"group_size {gs} does not divide the input dimension {k} of a tensor of shape "
            f"{tuple(x.shape)}; choose a divisor of {k}"
        )
    return rows.reshape(rows.shape[0], k // gs, gs)


def ungroup(xg: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    return xg.reshape(shape)


def observe_range(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `x` per quantization group, shaped like S (keepdim)."""
    xg = grouped_view(x.detach(), scheme).float()
    # one pass for both
    return torch.aminmax(xg, dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------
@dataclass
class QParams:
    """S and Z for one tensor under one scheme, shaped to broadcast against its grouped view."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    scheme: QuantScheme

    @property
    def qmin(self) -> float:
        return self.scheme.qmin

    @property
    def qmax(self) -> float:
        return self.scheme.qmax


def qparams_from_range(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    scheme: QuantScheme,
    scale_dtype: torch.dtype = torch.float32,
) -> QParams:
    """S and Z that map [min_val, max_val] onto the scheme's grid [l, u].

    The range is widened to contain 0 so that zero is exactly representable (padding,
    ReLU outputs). Where the range is empty (all zeros) S is set to 1 so that q = Z.
    S is rounded to `scale_dtype` *before* Z is computed, so the codes are the best ones
    for the scale that will actually be stored.
    """
    min_val = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_val = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    qmin, qmax = float(scheme.qmin), float(scheme.qmax)
    if scheme.symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = amax / qmax
    else:
        scale = (max_val - min_val) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(scale_dtype)
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.where(scale > 0, scale, torch.full_like(scale, tiny)).float()
    if scheme.symmetric:
        zero_point = torch.zeros_like(scale)
    else:
        zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax)
    return QParams(scale=scale, zero_point=zero_point, scheme=scheme)


def calculate_qparams(x: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype = torch.float32) -> QParams:
    """Min-max S and Z of `x` itself (what dynamic quantization does on every call)."""
    lo, hi = observe_range(x, scheme)
    return qparams_from_range(lo, hi, scheme, scale_dtype)


# --------------------------------------------------------------------------------------
# the maps
# --------------------------------------------------------------------------------------
def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Codes of `x` on qp's grid, in the scheme's storage dtype (int8, uint8 or fp8)."""
    scheme = qp.scheme
    xg = grouped_view(x, scheme).float()
    if scheme.is_fp8:
        qg = (xg / qp.scale).clamp(-qp.qmax, qp.qmax).to(FP8_DTYPES[scheme.type])
    else:
        qg = (torch.round(xg / qp.scale) + qp.zero_point).clamp(qp.qmin, qp.qmax).to(scheme.storage_dtype)
    return ungroup(qg, x.shape)


def dequantize(q: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x̂ = (q - Z) · S."""
    qg = grouped_view(q, qp.scheme).float()
    if qp.scheme.is_fp8:
        xg = qg * qp.scale
    else:
        xg = (qg - qp.zero_point) * qp.scale
    return ungroup(xg, q.shape).to(dtype)


def fake_quant(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize then dequantize, returning `x`'s dtype: the value the quantized model sees."""
    return dequantize(quantize(x, qp), qp, dtype=x.dtype)


def requantize(q: torch.Tensor, qp_from: QParams, qp_to: QParams) -> torch.Tensor:
    """Express codes of one grid on another (e.g. int8 activations rescaled for the next layer)."""
    return quantize(dequantize(q, qp_from), qp_to)


def quantize_dynamic(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, QParams]:
    """Per-call quantization (dynamic schemes, e.g. per-token activations)."""
    qp = calculate_qparams(x, scheme)
    return quantize(x, qp), qp


def round_trip_error_bound(qp: QParams) -> torch.Tensor:
    """Inside the representable range an integer grid never errs by more than S/2."""
    return qp.scale / 2
