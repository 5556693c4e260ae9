"""Plain-PyTorch references of the Triton kernels: the definitions the kernels are tested against.

W4A16 (weight-only int4, group-wise). The weight W (N out, K in) is stored exactly as
`QuantizedLinear` stores it in an artifact, so a kernel reads the artifact's buffers as they are:

    qweight  uint8, N·K/2 bytes: `quantcore.packing` int4 layout. Row-major codes, two per byte,
             the even k in the low nibble, so byte [n, j] = u[n, 2j] | u[n, 2j+1] << 4.
             Codes are unsigned: u = q - qmin (symmetric q in [-8, 7] is stored as q + 8).
    scales   S, one per (n, group of G consecutive k), any float dtype, shape (N, K/G) or
             (N, K/G, 1) (`QuantizedLinear.scale`); (N, 1) is per channel (G = K).
    zeros    Z per (n, group), uint8, same shape as S; None for symmetric grids, where the
             stored codes carry the offset Z = 8.

    Ŵ[n, k] = (u[n, k] - Z[n, k // G]) · S[n, k // G]           y = x Ŵᵀ (+ bias)

W8A8 (int8 weights per output channel, int8 activations per token, both symmetric):

    x_q[m, :], s_x[m] = quantize_per_token(x[m, :])  with s_x = max|x[m, :]| / 127,
                        x_q = clamp(round_half_even(x / s_x), -128, 127)
    y[m, n] = (Σ_k x_q[m, k] · w_q[n, k]) · s_x[m] · s_w[n] (+ bias[n])

The sum is exact in integers; it is computed here in float64, where every partial sum of
int8 products is exact (|sum| < 2^53), so this reference does not share int arithmetic with
the kernel it checks. `quantize_per_token` is the same map as the per-token dynamic
activation fake-quant of `QuantizedLinear` (its dequantization x_q · s_x gives those numbers).

FP8 W8A8 (float8 e4m3fn weights per output channel, as `QuantizedLinear` stores an fp8-rtn
layer, and e4m3fn activations per token):

    x_q[m, :], s_x[m] = quantize_per_token_fp8(x[m, :])  with s_x = max|x[m, :]| / 448,
                        x_q = e4m3(clamp(x / s_x, -448, 448))  (round to nearest, ties to even)
    y[m, n] = (Σ_k x_q[m, k] · w_q[n, k]) · s_x[m] · s_w[n] (+ bias[n])

As for int8 the sum is computed here in float64, from the codes, and it is exact: every
e4m3 value is a multiple of 2^-9 below 2^9, so a product is a multiple of 2^-18 below 448²,
and for K ≤ 2^17 every partial sum is a multiple of 2^-18 below 2^35, which float64's 53
bits hold. The kernel sums the same products in float32, where the sum rounds.

W4A4 + low-rank (SVDQuant's `LowRankQuantizedLinear`: the residual is the symmetric int4
group-G weight above, activations int4 symmetric per token per group of the same G):

    x̂ = x / smooth (in x's dtype)          lora_act = x̂ · L2ᵀ                  (M, r)
    x_q, s_x[m, g] = int4 per group of x̂:  s_x = max|x̂[m, g-th group]| / 7 (1 where 0),
                     x_q = clamp(round_half_even(x̂ / s_x), -8, 7)
    y[m, n] = Σ_g s_x[m, g] · s_w[n, g] · Σ_{k in g} x_q[m, k] · (u[n, k] - 8)
              + lora_act[m, :] · L1[n, :] (+ bias[n])

The group sums are integers, computed in float64 (exact), the rest in float64 too, rounded
once to the output dtype. x_q · s_x is `fake_quant_activations` of the layer's activation
scheme applied to x̂, so these are the layer's numbers up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantcore.packing import unpack_codes

INT4_SYMMETRIC_ZERO = 8  # -qmin of the signed int4 grid: symmetric codes are stored as q + 8
INT8_QMIN, INT8_QMAX = -128, 127


def int4_group_params(
    scales: torch.Tensor, zeros: torch.Tensor | None, out_features: int, in_features: int
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """S and Z as contiguous (N, K/G) matrices and the group size G they imply.

    Accepts the shapes `QuantizedLinear` stores ((N, K/G, 1), (N, 1), or (1, 1) per tensor,
    which is expanded to one S per channel)."""
    if scales.numel() == 1:
        scales = scales.reshape(1, 1).expand(out_features, 1)
        zeros = None if zeros is None else zeros.reshape(1, 1).expand(out_features, 1)
    if scales.numel() % out_features:
        raise ValueError(f"{scales.numel()} scales do not split into {out_features} output channels")
    groups = scales.numel() // out_features
    if in_features % groups:
        raise ValueError(f"{groups} groups per channel do not divide the input dimension {in_features}")
    s = scales.reshape(out_features, groups).contiguous()
    z = None
    if zeros is not None:
        if zeros.numel() != s.numel():
            raise ValueError(f"zeros has {zeros.numel()} entries, scales {s.numel()}: one Z per S")
        z = zeros.reshape(out_features, groups).contiguous()
    return s, z, in_features // groups


def int4_out_features(qweight: torch.Tensor, in_features: int) -> int:
    """N of a packed (N, K) int4 weight (`pack_codes` pads at most 7 codes, fewer than K ≥ 8)."""
    return qweight.numel() * 2 // in_features


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, out_features: int, in_features: int
) -> torch.Tensor:
    """Ŵ (N, K) in float32 from the packed codes, S and Z."""
    s, z, group_size = int4_group_params(scales, zeros, out_features, in_features)
    codes = unpack_codes(qweight.reshape(-1), 4, (out_features, in_features // group_size, group_size)).float()
    zero = z.float().unsqueeze(-1) if z is not None else INT4_SYMMETRIC_ZERO
    return ((codes - zero) * s.float().unsqueeze(-1)).reshape(out_features, in_features)


def w4a16_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x Ŵᵀ + bias: unpack, dequantize in float32, one matmul in x's dtype."""
    w = dequantize_int4(qweight, scales, zeros, int4_out_features(qweight, x.shape[-1]), x.shape[-1])
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per token (last dim): codes shaped like x, float32 scales shaped x[..., 0].
    An all-zero token gets S = 1 (its codes are 0 either way)."""
    xf = x.float()
    scale = torch.linalg.vector_norm(xf, float("inf"), dim=-1, keepdim=True) / INT8_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (xf / scale).round().clamp(INT8_QMIN, INT8_QMAX).to(torch.int8)
    return q, scale.squeeze(-1)


def w8a8_reference(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(x_q w_qᵀ) · s_x ⊗ s_w (+ bias). x_q (..., K) int8, x_scale (...) per token or one value;
    w_q (N, K) int8, w_scale (N,) / (N, 1) per channel or one value."""
    n = w_q.shape[0]
    acc = x_q.double() @ w_q.double().T  # exact: int8 products summed in float64
    s_x = x_scale.float().reshape(*x_q.shape[:-1], 1) if x_scale.numel() > 1 else x_scale.float().reshape(1)
    s_w = w_scale.float().reshape(-1).expand(n) if w_scale.numel() == 1 else w_scale.float().reshape(n)
    y = acc.float() * s_x * s_w
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def w8a8_linear_reference(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize x per token, then the int8 GEMM; output in x's dtype."""
    x_q, x_scale = quantize_per_token_reference(x)
    return w8a8_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype=x.dtype)


# ---------------------------------------------------------------------------------- FP8 W8A8
FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448: e4m3fn has no infinities


def quantize_per_token_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn per token (last dim): codes shaped like x, float32 scales shaped x[..., 0].
    PyTorch's cast rounds to nearest, ties to even; the clamp (as in `qparams.quantize`)
    keeps it in range, since e4m3fn has no infinity and what an out-of-range cast gives
    (NaN or 448) differs between implementations. An all-zero token gets S = 1."""
    xf = x.float()
    scale = torch.linalg.vector_norm(xf, float("inf"), dim=-1, keepdim=True) / FP8_E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (xf / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.squeeze(-1)


def fp8_w8a8_reference(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(x_q w_qᵀ) · s_x ⊗ s_w (+ bias), in float64 until the final cast. x_q (..., K)
    float8_e4m3fn, x_scale (...) per token or one value; w_q (N, K) float8_e4m3fn, w_scale
    (N,) / (N, 1) per channel or one value."""
    n = w_q.shape[0]
    acc = x_q.double() @ w_q.double().T  # exact for K ≤ 2^17 (module docstring)
    s_x = x_scale.double().reshape(*x_q.shape[:-1], 1) if x_scale.numel() > 1 else x_scale.double().reshape(1)
    s_w = w_scale.double().reshape(-1).expand(n) if w_scale.numel() == 1 else w_scale.double().reshape(n)
    y = acc * s_x * s_w
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype)


def fp8_linear_reference(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize x per token to e4m3, then the fp8 GEMM; output in x's dtype."""
    x_q, x_scale = quantize_per_token_fp8_reference(x)
    return fp8_w8a8_reference(x_q, x_scale, w_q, w_scale, bias, out_dtype=x.dtype)

INT4_QMIN, INT4_QMAX = -8, 7


def quantize_int4_groups_reference(x_hat: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per token per group of `group_size` inputs: int8 codes in [-8, 7] shaped
    like x_hat, float32 scales (..., K/G). An all-zero group gets S = 1 (its codes are 0)."""
    k = x_hat.shape[-1]
    groups = x_hat.float().reshape(*x_hat.shape[:-1], k // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True) / INT4_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (groups / scale).round().clamp(INT4_QMIN, INT4_QMAX).to(torch.int8)
    return q.reshape(x_hat.shape), scale.squeeze(-1)


def quantize_lowrank_input_reference(
    x: torch.Tensor, smooth: torch.Tensor, lora_down: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_codes, x_scales, lora_act) of x̂ = x / smooth: lora_act = x̂ L2ᵀ summed in float64."""
    x_hat = x / smooth.to(x.dtype)
    q, s = quantize_int4_groups_reference(x_hat, group_size)
    lora_act = (x_hat.double() @ lora_down.double().T).float()
    return q, s, lora_act


def w4a4_lowrank_reference(
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Σ_g s_x s_w (x_q w_qᵀ)_g + lora_act lora_upᵀ (+ bias), all in float64, one rounding."""
    k = x_codes.shape[-1]
    n = int4_out_features(qweight, k)
    s_w, _, group_size = int4_group_params(w_scales, None, n, k)
    groups = k // group_size
    xq = x_codes.reshape(-1, groups, group_size).double()
    s_x = x_scales.reshape(-1, groups).double()
    wq = unpack_codes(qweight.reshape(-1), 4, (n, groups, group_size)).double() - INT4_SYMMETRIC_ZERO
    acc = torch.zeros(xq.shape[0], n, dtype=torch.float64, device=x_codes.device)
    for g in range(groups):  # a loop, not one (M, N, groups) tensor: full-size layers fit in memory
        acc += (xq[:, g] @ wq[:, g].T) * s_x[:, g : g + 1] * s_w[:, g].double()
    acc += lora_act.reshape(-1, lora_act.shape[-1]).double() @ lora_up.double().T
    if bias is not None:
        acc += bias.double()
    return acc.to(out_dtype).reshape(*x_codes.shape[:-1], n)


def w4a4_lowrank_linear_reference(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole LowRankQuantizedLinear from float x: quantize x̂, then the GEMM; y in x's dtype."""
    k = x.shape[-1]
    _, _, group_size = int4_group_params(w_scales, None, int4_out_features(qweight, k), k)
    x_codes, x_scales, lora_act = quantize_lowrank_input_reference(x, smooth, lora_down, group_size)
    return w4a4_lowrank_reference(x_codes, x_scales, qweight, w_scales, lora_act, lora_up, bias, out_dtype=x.dtype)
