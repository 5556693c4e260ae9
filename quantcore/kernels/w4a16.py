"""W4A16: y = x Ŵᵀ (+ bias) with int4 group-wise weights dequantized in registers (Triton).

What it computes is `reference.w4a16_reference`: Ŵ[n, k] = (u[n, k] - Z[n, g]) · S[n, g] with
g = k // G, read straight from a `QuantizedLinear`'s buffers (layout in `reference`'s docstring:
the `quantcore.packing` int4 layout, two codes per byte, low nibble first, rows along K). The
float weight never exists in memory: each program loads a tile of packed bytes, splits the
nibbles in registers and feeds them to `tl.dot`. That is the point of W4A16 on a GPU: decoding
one token reads every weight once, so 4-bit weights move 4x fewer bytes than fp16.

Why the tiling is what it is:
* K tiles lie inside one group (BLOCK_K divides G). Then S and Z are one value per output
  column of the tile, and the scale is applied once to the tile's partial product:

      Σ_{k in tile} x[m, k] (u[n, k] - Z[n, g]) S[n, g]  =  S[n, g] · (x_tile @ (u - Z)_tileᵀ)[m, n]

  so the dot runs on the small integers u - Z (exact in fp16/bf16), and S costs BLOCK_M·BLOCK_N
  multiplies per tile instead of BLOCK_N·BLOCK_K.
* The weight tile is loaded as [BLOCK_N, BLOCK_K/2] bytes: along K each output channel's bytes
  are one contiguous run (64 bytes for BLOCK_K = 128), so loads are coalesced, and
  `tl.interleave(lo, hi)` puts the nibbles back in k order without loading a byte twice.
* Small M (decoding, M ≤ 16) is memory-bound: the time is the weight bytes over the bandwidth,
  and what matters is that every SM streams its share. With BLOCK_N = 64 a 4096-wide layer
  has only 64 column tiles, fewer than the SMs of a large GPU, each walking all of K. Split-K
  gives each program every SPLIT_K-th K tile of its columns and adds the partial sums into an
  fp32 output with atomics (the order of those few adds is not fixed: results may differ in
  the last bit from run to run). BLOCK_M = 16 is the smallest tile `tl.dot` takes; the idle
  rows cost arithmetic, which is not the bottleneck here.
* Larger M reuses each unpacked weight tile across more rows (BLOCK_M up to 64, BLOCK_N 128)
  and needs no split: there are enough tiles to fill the GPU.

The sizes are a heuristic, not tuned on a GPU yet (`w4a16_config`); a caller can pass its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantcore.kernels.reference import INT4_SYMMETRIC_ZERO, int4_group_params, int4_out_features


@triton.jit
def _w4a16_kernel(
    x_ptr,  # (M, K) activations, rows `stride_xm` apart, k contiguous
    qw_ptr,  # (N, K/2) packed int4 codes, contiguous
    s_ptr,  # (N, K/G) scales, contiguous
    z_ptr,  # (N, K/G) uint8 zero points, contiguous (unused when not HAS_ZERO)
    bias_ptr,  # (N,) (unused when not HAS_BIAS)
    y_ptr,  # (M, N) output, contiguous; float32 and zero-filled when SPLIT_K > 1
    M,
    N,
    K,
    stride_xm,
    GROUP_SIZE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SYM_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_byte = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    groups = K // GROUP_SIZE

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K tiles pid_k, pid_k + SPLIT_K, ...; BLOCK_K divides G divides K, so no K mask is needed.
    for t in range(pid_k, K // BLOCK_K, SPLIT_K):
        k0 = t * BLOCK_K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0.0)
        packed = tl.load(qw_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + offs_byte)[None, :], mask=mask_n[:, None], other=0)
        codes = tl.interleave(packed & 0xF, packed >> 4).to(tl.int32)  # [BLOCK_N, BLOCK_K], k order

        g = k0 // GROUP_SIZE  # the one group of this tile
        s = tl.load(s_ptr + offs_n * groups + g, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + offs_n * groups + g, mask=mask_n, other=0).to(tl.int32)
            centered = codes - z[:, None]
        else:
            centered = codes - SYM_ZERO
        w = centered.to(x.dtype)  # integers in [-15, 15]: exact in every float type

        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION) * s[None, :]

    if HAS_BIAS:
        if pid_k == 0:  # added once: by the first K split only
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


@dataclass(frozen=True)
class W4A16Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def largest_block_k(group_size: int, limit: int = 128) -> int:
    """The largest power of two ≤ limit that divides G: K tiles must not straddle groups."""
    block = 1
    while block * 2 <= limit and group_size % (block * 2) == 0:
        block *= 2
    if block < 16:
        raise ValueError(f"group size {group_size} is not a multiple of 16, the smallest K tile tl.dot takes")
    return block


def w4a16_config(m: int, n: int, k: int, group_size: int, num_sms: int) -> W4A16Config:
    """Tile sizes for an (m, k) x (k, n) product on a device with `num_sms` multiprocessors
    (see the module docstring for why)."""
    block_k = largest_block_k(group_size)
    if m <= 16:
        block_m, block_n = 16, 64
    elif m <= 32:
        block_m, block_n = 32, 64
    else:
        block_m, block_n = 64, 128
    k_tiles = k // block_k
    split_k = 1
    if m <= 16:
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        # at least two programs per SM, each still walking at least one K tile
        split_k = max(1, min(k_tiles, triton.cdiv(2 * num_sms, tiles)))
    return W4A16Config(block_m, block_n, block_k, split_k)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: splitting gains nothing


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
) -> torch.Tensor:
    """y = x Ŵᵀ (+ bias) for x (..., K) in fp16, bf16 or fp32; y has x's dtype.

    `qweight`, `scales`, `zeros` are a `QuantizedLinear`'s 4-bit buffers (or the same layout;
    see `reference`). The group size is implied by the number of scales per channel."""
    k = x.shape[-1]
    n = int4_out_features(qweight, k)
    s, z, group_size = int4_group_params(scales, zeros, n, k)
    if k % 2 or qweight.numel() < n * k // 2:
        raise ValueError(f"qweight has {qweight.numel()} bytes, an ({n}, {k}) int4 weight needs {n * k // 2}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or w4a16_config(m, n, k, group_size, _num_sms(x.device))
    if group_size % cfg.block_k:
        raise ValueError(f"block_k {cfg.block_k} must divide the group size {group_size}")

    split = cfg.split_k > 1
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device) if split else torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    _w4a16_kernel[grid](
        x2,
        qweight.reshape(-1).contiguous(),
        s,
        z if z is not None else s,  # placeholder pointer, never read
        bias.contiguous() if bias is not None else s,
        y,
        m,
        n,
        k,
        x2.stride(0),
        GROUP_SIZE=group_size,
        HAS_ZERO=z is not None,
        HAS_BIAS=bias is not None,
        SYM_ZERO=INT4_SYMMETRIC_ZERO,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        SPLIT_K=cfg.split_k,
        # fp32 inputs would otherwise go through TF32 on the GPU (10-bit mantissa)
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
