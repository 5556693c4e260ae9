"""SVDQuant W4A4 with its low-rank branch fused in, as Nunchaku runs it (Triton).

What it computes is `reference.w4a4_lowrank_linear_reference`, a `LowRankQuantizedLinear`:

    x̂ = x / smooth                                        (in x's dtype, as the layer divides)
    x_q[m, k], s_x[m, g] = int4 symmetric per token per group of G inputs of x̂
    y[m, n] = Σ_g s_x[m, g] · s_w[n, g] · Σ_{k in g} x_q[m, k] · w_q[n, k]     the 4-bit GEMM
              + (x̂ · L2ᵀ)[m, :] · L1[n, :]                                     the low-rank branch
              (+ bias[n])

with the residual's weight read as `QuantizedLinear` stores it (int4 symmetric, group G,
unsigned nibbles u = q + 8, layout in `reference`'s docstring) and L1 = `lora_up` (N, r),
L2 = `lora_down` (r, K), `smooth` (K,) the layer's buffers.

Why fuse. Run as it is written, the rank-r branch is two small GEMMs that move big tensors:
the down-projection reads x̂ (M·K 16-bit values, four times the int4 codes' bytes) a second
time, and the up-projection writes an M·N 16-bit output that an add then reads back with the
GEMM's. The SVDQuant paper measured that overhead at 57% of the 4-bit GEMM's time for rank 32,
which would give back most of what 4-bit activations gain. Nunchaku hides it in two kernels:

  1. `quantize_lowrank_input`: each program reads its x tile once, divides by smooth, writes
     the int4 codes and the group scales, and multiplies the same registers by L2ᵀ
     (`tl.dot`), so the down-projection costs no extra read of x: lora_act (M, r) in fp32.
  2. `w4a4_lowrank_matmul`: the 4-bit GEMM; its epilogue, with the fp32 accumulator still in
     registers, adds lora_act_tile · L1_tileᵀ (one more `tl.dot`, r = 32 deep), the bias, and
     casts. The branch's output never exists in memory.

What the branch adds to the two kernels is rank-r thin: per tile an (r, G) slice of L2, an
(N-tile, r) slice of L1 and an (M-tile, r) slice of lora_act, a few KB each.

Choices, and why:
* Activation codes are stored one per byte (int8 holding -8..7), not two per byte. Triton
  has no 4-bit `tl.dot`, so the GEMM multiplies in int8 either way (int32 accumulation), and
  int8 codes go into it as loaded; packed ones would need a shift-and-sign-extend per element
  per N tile. The bytes this costs are small beside the weight's: M·K against N·K/2 from
  DRAM (3% at M = 64, N = 4096), and the re-reads of the code tile by each column tile come
  from L2. It also keeps the codes readable as they are (tests compare them to the reference).
* One K step is one group (BLOCK_K = G = 64 for the preset): the group's int8 dot is exact in
  int32 (|Σ| ≤ 64·8·8), then scaled by s_x[m, g] · s_w[n, g] into the fp32 accumulator. The
  scales cannot be pulled out of the K loop as in W8A8, because both change with the group.
  G must be a power of two ≥ 16 (`tl.arange`, and the smallest K `tl.dot` takes).
* The weight tile is [BLOCK_N, G/2] bytes, contiguous along K per output channel (coalesced);
  `tl.interleave(lo, hi)` restores k order, minus 8 gives the signed codes.
* Quantization matches PyTorch bit for bit: x̂ is rounded to x's dtype exactly as `x / smooth`
  rounds it (an fp32 `div_rn`, then the cast: correctly rounded for fp16/bf16, whose 11/8-bit
  mantissas are under half of fp32's), S = max|x̂| / 7 by `div_rn`, codes by `div_rn` and
  round-half-even, as `quantcore.qparams` computes them for a dynamic activation scheme.
* Parallelism. Small M leaves few output tiles (M = 64, N = 4096 in 64x128 tiles: 32 programs
  for a 132-SM H200), so both kernels can split K: the quantizer gives each program a run of
  groups and adds its partial lora_act with fp32 atomics (codes and scales of different groups
  never overlap); the GEMM adds split partial sums into an fp32 output (cast once after), and
  only the first split adds the low-rank term and the bias. Atomic adds make the last bits
  order-dependent.
  The tile sizes (`w4a4_config`, `quantize_config`) are heuristics, not tuned on a GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantcore.kernels.reference import INT4_SYMMETRIC_ZERO, int4_group_params, int4_out_features
from quantcore.kernels.w8a8 import _round_half_even  # torch.round's half-to-even, bit for bit
from quantcore.schemes import Granularity

INT4_QMIN, INT4_QMAX = -8, 7

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ------------------------------------------------------------------ smoothing + int4 quantization + down-projection
@triton.jit
def _quantize_lowrank_kernel(
    x_ptr,  # (M, K) float activations, rows `stride_xm` apart, k contiguous
    smooth_ptr,  # (K,)
    down_ptr,  # (R, K) lora_down, contiguous
    q_ptr,  # (M, K) int8 codes out, contiguous
    s_ptr,  # (M, K/G) float32 scales out, contiguous
    act_ptr,  # (M, R) float32 lora_act out; zero-filled when ATOMIC (K split across programs)
    M,
    K,
    R,
    stride_xm,
    GROUPS_PER_PROGRAM,
    GROUP_SIZE: tl.constexpr,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, GROUP_SIZE)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    groups = K // GROUP_SIZE

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    first = pid_k * GROUPS_PER_PROGRAM
    for g in range(first, tl.minimum(first + GROUPS_PER_PROGRAM, groups)):
        k = g * GROUP_SIZE + offs_g
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None], other=0.0)
        sm = tl.load(smooth_ptr + k).to(tl.float32)
        # x̂ in x's dtype, the value the layer's `x / smooth` produces (see the module docstring)
        x_hat = tl.math.div_rn(x.to(tl.float32), sm[None, :]).to(x.dtype)
        xf = x_hat.to(tl.float32)

        scale = tl.math.div_rn(tl.max(tl.abs(xf), axis=1), QMAX)
        scale = tl.where(scale > 0.0, scale, 1.0)  # an all-zero group: codes 0 with any scale
        q = _round_half_even(tl.math.div_rn(xf, scale[:, None]))
        q = tl.minimum(tl.maximum(q, QMIN), QMAX)
        tl.store(q_ptr + offs_m[:, None] * K + k[None, :], q.to(tl.int8), mask=mask_m[:, None])
        tl.store(s_ptr + offs_m * groups + g, scale, mask=mask_m)

        # the down-projection from the same registers: x̂ (BLOCK_M, G) @ L2ᵀ (G, BLOCK_R)
        down = tl.load(down_ptr + offs_r[:, None] * K + k[None, :], mask=mask_r[:, None], other=0.0).to(x.dtype)
        acc = tl.dot(x_hat, tl.trans(down), acc, input_precision=DOT_PRECISION)

    act_ptrs = act_ptr + offs_m[:, None] * R + offs_r[None, :]
    mask = mask_m[:, None] & mask_r[None, :]
    if not ATOMIC:
        tl.store(act_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(act_ptrs, acc, mask=mask)


@dataclass(frozen=True)
class QuantizeConfig:
    block_m: int
    split_k: int = 1
    num_warps: int = 4


def quantize_config(m: int, groups: int, num_sms: int) -> QuantizeConfig:
    """Row tiles of 16..64 tokens; K split so that about two programs run per SM, each
    walking at least two groups (the kernel is a streaming pass: it needs many loads in flight)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    row_tiles = triton.cdiv(m, block_m)
    split = max(1, min(groups // 2, triton.cdiv(2 * num_sms, row_tiles)))
    return QuantizeConfig(block_m, split)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another: splitting gains nothing


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 on the GPU (10-bit mantissa)
    return "ieee" if dtype == torch.float32 else "tf32"


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot's smallest N / K, and arange's power of two


def _check_group_size(group_size: int) -> None:
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group size {group_size}: the fused W4A4 kernels take a power of two ≥ 16 (one group per K step)")


def quantize_lowrank_input(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    group_size: int = 64,
    config: QuantizeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_codes, x_scales, lora_act) of x (..., K) in fp16, bf16 or fp32: x̂ = x / smooth,
    int8 codes in [-8, 7] shaped like x, float32 scales (..., K/G), lora_act = x̂ L2ᵀ (..., r)
    in float32. Same codes and scales as `reference.quantize_lowrank_input_reference`."""
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"x must be one of {list(_TL_DTYPES)}, got {x.dtype}")
    k = x.shape[-1]
    _check_group_size(group_size)
    if k % group_size:
        raise ValueError(f"group size {group_size} does not divide the input dimension {k}")
    rank = lora_down.shape[0]
    if lora_down.shape != (rank, k) or smooth.numel() != k:
        raise ValueError(f"lora_down {tuple(lora_down.shape)} and smooth ({smooth.numel()},) do not match K = {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, groups = x2.shape[0], k // group_size
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    cfg = config or quantize_config(m, groups, _num_sms(x.device))
    per_program = triton.cdiv(groups, cfg.split_k)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(groups, per_program))
    atomic = grid[1] > 1
    act = (torch.zeros if atomic else torch.empty)(m, rank, dtype=torch.float32, device=x.device)
    if m:
        _quantize_lowrank_kernel[grid](
            x2,
            smooth.contiguous(),
            lora_down.contiguous(),
            q,
            s,
            act,
            m,
            k,
            rank,
            x2.stride(0),
            per_program,
            GROUP_SIZE=group_size,
            QMIN=INT4_QMIN,
            QMAX=INT4_QMAX,
            BLOCK_M=cfg.block_m,
            BLOCK_R=_rank_block(rank),
            ATOMIC=atomic,
            DOT_PRECISION=_dot_precision(x.dtype),
            num_warps=cfg.num_warps,
        )
    lead = x.shape[:-1]
    return q.reshape(x.shape), s.reshape(*lead, groups), act.reshape(*lead, rank)


# ------------------------------------------------------------------ 4-bit GEMM with the up-projection in its epilogue
@triton.jit
def _w4a4_lowrank_kernel(
    xq_ptr,  # (M, K) int8 activation codes, contiguous
    xs_ptr,  # (M, K/G) float32 activation scales, contiguous
    qw_ptr,  # (N, K/2) packed unsigned int4 weight codes, contiguous
    ws_ptr,  # (N, K/G) weight scales, contiguous
    act_ptr,  # (M, R) float32 lora_act, contiguous
    up_ptr,  # (N, R) lora_up, contiguous
    bias_ptr,  # (N,) (unused when not HAS_BIAS)
    y_ptr,  # (M, N) output, contiguous; float32 and zero-filled when SPLIT_K > 1
    M,
    N,
    K,
    R,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SYM_ZERO: tl.constexpr,
    LORA_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, GROUP_SIZE)
    offs_byte = tl.arange(0, GROUP_SIZE // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    groups = K // GROUP_SIZE

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # groups pid_k, pid_k + SPLIT_K, ...; one group per step, so s_x and s_w are one per row / column
    for g in range(pid_k, groups, SPLIT_K):
        k0 = g * GROUP_SIZE
        a = tl.load(xq_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0)
        packed = tl.load(qw_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + offs_byte)[None, :], mask=mask_n[:, None], other=0)
        u = tl.interleave(packed & 0xF, packed >> 4)  # [BLOCK_N, G] unsigned codes, k order
        w = (u.to(tl.int8) - SYM_ZERO).to(tl.int8)  # signed codes in [-8, 7]
        part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)  # exact: |Σ| ≤ G·64

        s_x = tl.load(xs_ptr + offs_m * groups + g, mask=mask_m, other=0.0)
        s_w = tl.load(ws_ptr + offs_n * groups + g, mask=mask_n, other=0.0).to(tl.float32)
        acc += part.to(tl.float32) * s_x[:, None] * s_w[None, :]

    if pid_k == 0:  # the epilogue's additions happen once: in the first K split only
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        # the up-projection, in the layer's compute dtype as `F.linear(..., lora_up.to(x.dtype))`
        act = tl.load(act_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        up = tl.load(up_ptr + offs_n[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(act.to(LORA_DTYPE), tl.trans(up.to(LORA_DTYPE)), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


@dataclass(frozen=True)
class W4A4Config:
    block_m: int
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def w4a4_config(m: int, n: int, groups: int, num_sms: int) -> W4A4Config:
    """Tile sizes by the number of tokens; K is split when the output tiles leave SMs idle,
    keeping at least four groups per split so each program still pipelines its loads."""
    if m <= 16:
        block_m, block_n, warps = 16, 64, 4
    elif m <= 32:
        block_m, block_n, warps = 32, 64, 4
    elif m <= 64:
        # 128 columns: each column tile re-reads the M·K code tile, so wider tiles halve those reads
        block_m, block_n, warps = 64, 128, 4
    else:
        block_m, block_n, warps = 128, 128, 8
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split = max(1, min(groups // 4, triton.cdiv(num_sms, tiles))) if tiles < num_sms else 1
    return W4A4Config(block_m, block_n, split, num_warps=warps)


def w4a4_lowrank_matmul(
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    lora_act: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    config: W4A4Config | None = None,
) -> torch.Tensor:
    """y = Σ_g s_x s_w (x_q w_qᵀ)_g + lora_act · lora_upᵀ (+ bias), in `out_dtype`.

    x_codes (..., K) int8 in [-8, 7], x_scales (..., K/G) float32 (from `quantize_lowrank_input`);
    qweight, w_scales a symmetric int4 `QuantizedLinear`'s buffers with the same group size G;
    lora_act (..., r) float32; lora_up (N, r). The low-rank product runs in `out_dtype`."""
    if x_codes.dtype != torch.int8:
        raise TypeError(f"int8 activation codes expected, got {x_codes.dtype}")
    if out_dtype not in _TL_DTYPES:
        raise TypeError(f"out_dtype must be one of {list(_TL_DTYPES)}, got {out_dtype}")
    k = x_codes.shape[-1]
    n = int4_out_features(qweight, k)
    s_w, _, group_size = int4_group_params(w_scales, None, n, k)
    _check_group_size(group_size)
    groups = k // group_size
    a = x_codes.reshape(-1, k).contiguous()
    m = a.shape[0]
    s_x = x_scales.reshape(m, -1).float().contiguous()
    if s_x.shape[1] != groups:
        raise ValueError(f"{s_x.shape[1]} activation scales per token, the weight has {groups} groups: one group size for both")
    rank = lora_up.shape[-1]
    act = lora_act.reshape(m, -1).float().contiguous()
    if lora_up.shape != (n, rank) or act.shape[1] != rank:
        raise ValueError(f"lora_up {tuple(lora_up.shape)} and lora_act {tuple(lora_act.shape)} do not match N = {n}")

    cfg = config or w4a4_config(m, n, groups, _num_sms(a.device))
    split = cfg.split_k > 1
    y = torch.zeros(m, n, dtype=torch.float32, device=a.device) if split else torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m:
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
        _w4a4_lowrank_kernel[grid](
            a,
            s_x,
            qweight.reshape(-1).contiguous(),
            s_w,
            act,
            lora_up.contiguous(),
            bias.contiguous() if bias is not None else s_w,  # placeholder pointer, never read
            y,
            m,
            n,
            k,
            rank,
            GROUP_SIZE=group_size,
            HAS_BIAS=bias is not None,
            SYM_ZERO=INT4_SYMMETRIC_ZERO,
            LORA_DTYPE=_TL_DTYPES[out_dtype],
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_R=_rank_block(rank),
            SPLIT_K=cfg.split_k,
            DOT_PRECISION=_dot_precision(out_dtype),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return y.to(out_dtype).reshape(*x_codes.shape[:-1], n)


# ------------------------------------------------------------------ the whole layer
def w4a4_lowrank_linear(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    qweight: torch.Tensor,
    w_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A LowRankQuantizedLinear forward from its buffers, two kernel launches; y in x's dtype.
    The activation group size is the weight's (the preset quantizes both in groups of 64)."""
    k = x.shape[-1]
    _, _, group_size = int4_group_params(w_scales, None, int4_out_features(qweight, k), k)
    x_codes, x_scales, lora_act = quantize_lowrank_input(x, smooth, lora_down, group_size)
    return w4a4_lowrank_matmul(x_codes, x_scales, qweight, w_scales, lora_act, lora_up, bias, out_dtype=x.dtype)


def lowrank_w4a4_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """`layer(x)` for a `LowRankQuantizedLinear` whose residual is int4 symmetric group-wise
    with dynamic int4 symmetric activations in groups of the same size (`w4a4-svdquant-r32`)."""
    w, a = layer.weight_scheme, layer.activation_scheme
    for role, s in (("weights", w), ("activations", a)):
        if s is None or s.is_fp8 or s.bits != 4 or not s.symmetric or s.granularity != Granularity.GROUP:
            raise ValueError(f"{role}: the fused W4A4 kernels take int4 symmetric group-wise schemes, got "
                             f"{s.short_name() if s else 'float'}")
    if not a.dynamic or a.group_size != w.group_size:
        raise ValueError(f"activations {a.short_name()}: dynamic, in the weights' groups of {w.group_size}, expected")
    r = layer.residual
    return w4a4_lowrank_linear(x, layer.smooth, layer.lora_down, layer.lora_up, r.qweight, r.scale, r.bias)
