"""W8A8: int8 activations x int8 weights, int32 accumulation, float epilogue (Triton).

What it computes is `reference.w8a8_reference` (SmoothQuant's W8A8 with dynamic per-token
activations):

    x_q, s_x = quantize_per_token(x)                 s_x[m] = max_k |x[m, k]| / 127
    y[m, n]  = (Σ_k x_q[m, k] · w_q[n, k]) · s_x[m] · s_w[n] (+ bias[n])

The weight is a `QuantizedLinear`'s int8 symmetric per-channel buffers as stored (w_q (N, K)
int8, k contiguous; S (N, 1)). Because both scales factor out of the sum over k, the GEMM
runs entirely in int8 with an int32 accumulator (exact: |Σ| ≤ K · 128² < 2³¹ for K < 131072)
and the scales are applied once per output element in the epilogue: one multiply by the
row's s_x and the column's s_w, the bias, the cast to the output dtype.

Tiling of the GEMM: BLOCK_K = 64 int8s is 64 bytes per row of each operand per step, the
width of one int8 MMA instruction pair on NVIDIA GPUs (k = 32 each); rows along K are
contiguous in both x_q and w_q, so both tiles load coalesced and w_q's is transposed in
registers (`tl.trans`). BLOCK_M grows with M (16 is the smallest `tl.dot` tile, 128 for
prefill-sized M), BLOCK_N is 64 for small M (more column tiles to spread over the SMs) and
128 when M is large enough to fill the GPU with row tiles. K need not divide BLOCK_K: the
last tile is masked with zeros, which add nothing to an integer sum.

Activation quantization (`quantize_per_token`) is one program per token: a first pass over
the row finds max |x| (in chunks of BLOCK elements, so any K fits in registers), a second
divides and rounds. Division is IEEE (`div_rn`) and rounding is half-to-even, so the codes
are bit-identical to PyTorch's `(x / s).round()` in the reference, not merely close.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantcore.kernels.reference import INT8_QMAX, INT8_QMIN


# ------------------------------------------------------------------ per-token activation quantization
@triton.jit
def _round_half_even(x):
    """torch.round for |x| < 2²³: floor, then up when the fraction is over one half or exactly
    one half with an odd floor. (x - floor(x) is exact in that range.)"""
    low = tl.floor(x)
    frac = x - low
    odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, low + 1.0, low)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr,  # (M, K), rows `stride_xm` apart, k contiguous
    q_ptr,  # (M, K) int8, contiguous
    s_ptr,  # (M,) float32
    K,
    stride_xm,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK)

    absmax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = tl.math.div_rn(tl.max(absmax, axis=0), QMAX)
    scale = tl.where(scale > 0.0, scale, 1.0)  # an all-zero token: codes 0 with any scale
    tl.store(s_ptr + row, scale)

    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = _round_half_even(tl.math.div_rn(x, scale))
        q = tl.minimum(tl.maximum(q, QMIN), QMAX)
        tl.store(q_ptr + row * K + k0 + offs, q.to(tl.int8), mask=mask)


def quantize_per_token(x: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per token (the last dim): codes shaped like x, float32 scales shaped
    x[..., 0]. Same numbers as `reference.quantize_per_token_reference`."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = min(block, triton.next_power_of_2(k))
        _quantize_per_token_kernel[(m,)](x2, q, s, k, x2.stride(0), QMIN=INT8_QMIN, QMAX=INT8_QMAX, BLOCK=block)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


# ------------------------------------------------------------------ int8 GEMM with scale epilogue
@triton.jit
def _w8a8_kernel(
    xq_ptr,  # (M, K) int8, contiguous
    wq_ptr,  # (N, K) int8, contiguous
    xs_ptr,  # (M,) float32 per-token scales
    ws_ptr,  # (N,) float32 per-channel scales
    bias_ptr,  # (N,) (unused when not HAS_BIAS)
    y_ptr,  # (M, N) output, contiguous
    M,
    N,
    K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        a = tl.load(xq_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(wq_ptr + offs_n[:, None] * K + (k0 + offs_k)[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)

    s_x = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    s_w = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * s_x[:, None] * s_w[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class W8A8Config:
    block_m: int
    block_n: int
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


def w8a8_config(m: int) -> W8A8Config:
    """Tile sizes by the number of tokens (see the module docstring)."""
    if m <= 16:
        return W8A8Config(16, 64)
    if m <= 32:
        return W8A8Config(32, 64)
    if m <= 64:
        return W8A8Config(64, 64)
    return W8A8Config(128, 128, num_warps=8)


def _per_row(scale: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """A per-row float32 vector from one value, (rows,) or (rows, 1)."""
    s = scale.float().reshape(-1)
    if s.numel() == 1:
        return s.expand(rows).contiguous()
    if s.numel() != rows:
        raise ValueError(f"{what} has {s.numel()} scales for {rows} rows")
    return s.contiguous()


def w8a8_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    config: W8A8Config | None = None,
) -> torch.Tensor:
    """(x_q w_qᵀ) · s_x ⊗ s_w (+ bias): x_q (..., K) int8 with one scale per token (or one in
    all), w_q (N, K) int8 with one scale per output channel (or one in all)."""
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8:
        raise TypeError(f"int8 operands expected, got {x_q.dtype} and {w_q.dtype}")
    k = x_q.shape[-1]
    n = w_q.shape[0]
    if w_q.shape != (n, k):
        raise ValueError(f"weight shape {tuple(w_q.shape)} does not match K = {k}")
    a = x_q.reshape(-1, k).contiguous()
    m = a.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m:
        cfg = config or w8a8_config(m)
        s_x = _per_row(x_scale, m, "x_scale")
        s_w = _per_row(w_scale, n, "w_scale")
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
        _w8a8_kernel[grid](
            a,
            w_q.contiguous(),
            s_x,
            s_w,
            bias.contiguous() if bias is not None else s_w,  # placeholder pointer, never read
            y,
            m,
            n,
            k,
            HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return y.reshape(*x_q.shape[:-1], n)


def w8a8_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A W8A8 Linear with dynamic per-token activations: quantize x, int8 GEMM; y in x's dtype."""
    x_q, x_scale = quantize_per_token(x)
    return w8a8_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype=x.dtype)
