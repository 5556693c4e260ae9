"""FP8 W8A8: e4m3 activations x e4m3 weights, fp32 accumulation, float epilogue (Triton).

What it computes is `reference.fp8_w8a8_reference` (the fp8 counterpart of `w8a8`, with
dynamic per-token activations):

    x_q, s_x = quantize_per_token_fp8(x)      s_x[m] = max_k |x[m, k]| / 448
    y[m, n]  = (Σ_k x_q[m, k] · w_q[n, k]) · s_x[m] · s_w[n] (+ bias[n])

The weight is a `QuantizedLinear`'s fp8_e4m3 per-channel buffers as stored by the "fp8-rtn"
recipe (w_q (N, K) float8_e4m3fn, k contiguous; S (N, 1) float16). As in `w8a8` both scales
factor out of the sum over k, so the GEMM multiplies the e4m3 codes themselves and the scales
are applied once per output element in the epilogue. Unlike int8 the sum is not exact: a
product of two e4m3 values (4 significant bits each) is exact in float32, but the running
sum rounds: float32 accumulation of exact products (on Hopper, within each BLOCK_K tile,
the MMA's own narrower adder; see the tiling below).

fp8 tensor cores need compute capability 8.9 or newer (Ada, Hopper, Blackwell); on older
GPUs Triton has no float8e4nv type at all. `fp8_supported(device)` says whether these
kernels can run on a device, and why not. Under TRITON_INTERPRET=1 it runs a small probe.

Tiling of the GEMM: BLOCK_K = 128 e4m3s is 128 bytes per row of each operand per step, four
k = 32 fp8 MMA instructions, and the widest (128-byte) shared-memory swizzle on Hopper.
Hopper's fp8 wgmma adds into its accumulator with only about 14 bits of mantissa
(DeepSeek-V3 report, §3.3.2), and Triton lets a whole K loop accumulate that way on sm_90
unless told otherwise; `max_num_imprecise_acc=BLOCK_K` makes it add each tile's partial
sum into a true float32 accumulator instead (every 128 k, DeepSeek-V3's interval), so the
error does not grow with K. Both operands are loaded k-contiguous and w_q's tile is
transposed in registers (`tl.trans`): fp8 wgmma only takes K-major operands, which is
exactly the (N, K) layout QuantizedLinear stores. BLOCK_M / BLOCK_N grow with M as in
`w8a8` (16 is the smallest `tl.dot` tile, 128 x 128 for prefill-sized M, there with two
pipeline stages: 2 x 32 KB stays inside the 99 KB of shared memory an Ada SM gives one
block). K need not divide BLOCK_K: the last tile is masked with zeros.

Activation quantization (`quantize_per_token_fp8`) is one program per token, two passes as
in `w8a8`: max |x|, then x / s_x (IEEE `div_rn`), clamped to ±448 and rounded to e4m3 in
float32 arithmetic before the cast (see `_round_to_e4m3` for why), so the codes are
bit-identical to PyTorch's `.to(torch.float8_e4m3fn)` in the reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantcore.kernels import interpreting
from quantcore.kernels.reference import FP8_E4M3_MAX
from quantcore.kernels.w8a8 import _per_row, _round_half_even

FP8_DTYPE = torch.float8_e4m3fn


# ------------------------------------------------------------------ per-token activation quantization
@triton.jit
def _round_to_e4m3(v):
    """v (float32, |v| ≤ 448) rounded to the nearest e4m3 value, ties to even, still float32.

    Done in arithmetic rather than left to `.to(tl.float8e4nv)` because that cast is not
    correctly rounded everywhere: Triton 3.9's interpreter (triton-lang/triton#8322) rounds
    ties up, loses the carry when the mantissa overflows (126.2 -> 64, not 128) and rounds
    subnormals wrongly, and on Ada the compiled fp32 -> e4m3 path rounds twice, through fp16
    (per triton-lang/triton#11753). A value already on the e4m3 grid converts exactly on all of
    them, so the cast afterwards only changes the storage.

    e4m3 keeps 3 mantissa bits: the spacing in v's binade [2^e, 2^(e+1)) is 2^(e-3), and
    2^-9 below the smallest normal 2^-6. The exponent comes from v's bits (exact, where a
    log2 would not be), scaling by powers of two is exact (a multiply, where a compiled `/`
    may be the approximate div.full), and rounding up to the next binade's first value
    (16 · spacing) is itself an e4m3 value."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) & 0xFF  # float32's biased exponent (0 for zeros and subnormals)
    spacing_exponent = tl.maximum(exponent, 127 - 6) - 3  # biased: spacing = 2^(this - 127)
    spacing = (spacing_exponent << 23).to(tl.float32, bitcast=True)
    inverse = ((254 - spacing_exponent) << 23).to(tl.float32, bitcast=True)  # 1 / spacing
    r = _round_half_even(tl.abs(v) * inverse) * spacing
    return tl.where(bits < 0, -r, r)  # by the sign bit, so -0.0 and tiny negatives stay -0.0


@triton.jit
def _quantize_per_token_fp8_kernel(
    x_ptr,  # (M, K), rows `stride_xm` apart, k contiguous
    q_ptr,  # (M, K) float8_e4m3fn, contiguous
    s_ptr,  # (M,) float32
    K,
    stride_xm,
    FP8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK)

    absmax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = tl.math.div_rn(tl.max(absmax, axis=0), FP8_MAX)
    scale = tl.where(scale > 0.0, scale, 1.0)  # an all-zero token: codes 0 with any scale
    tl.store(s_ptr + row, scale)

    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        # x / s_x ≤ 448 up to the division's rounding, which _round_to_e4m3 takes back to 448;
        # the clamp (as in qparams.quantize) keeps any code finite: 480 would be e4m3fn's NaN
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + row * K + k0 + offs, _round_to_e4m3(v).to(q_ptr.dtype.element_ty), mask=mask)


def quantize_per_token_fp8(x: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric e4m3 per token (the last dim): float8_e4m3fn codes shaped like x, float32
    scales shaped x[..., 0]. Same bits as `reference.quantize_per_token_fp8_reference`."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = min(block, triton.next_power_of_2(k))
        _quantize_per_token_fp8_kernel[(m,)](x2, q, s, k, x2.stride(0), FP8_MAX=FP8_E4M3_MAX, BLOCK=block)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


# ------------------------------------------------------------------ fp8 GEMM with scale epilogue
@triton.jit
def _fp8_kernel(
    xq_ptr,  # (M, K) float8_e4m3fn, contiguous
    wq_ptr,  # (N, K) float8_e4m3fn, contiguous
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        a = tl.load(xq_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(wq_ptr + offs_n[:, None] * K + (k0 + offs_k)[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        # a full float32 add per tile on Hopper (module docstring); other GPUs accumulate in float32 anyway
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K)

    s_x = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    s_w = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc * s_x[:, None] * s_w[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class Fp8Config:
    block_m: int
    block_n: int
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


def fp8_config(m: int) -> Fp8Config:
    """Tile sizes by the number of tokens (see the module docstring)."""
    if m <= 16:
        return Fp8Config(16, 64)
    if m <= 32:
        return Fp8Config(32, 64)
    if m <= 64:
        return Fp8Config(64, 64)
    return Fp8Config(128, 128, num_warps=8, num_stages=2)


def fp8_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    config: Fp8Config | None = None,
) -> torch.Tensor:
    """(x_q w_qᵀ) · s_x ⊗ s_w (+ bias): x_q (..., K) float8_e4m3fn with one scale per token
    (or one in all), w_q (N, K) float8_e4m3fn with one scale per output channel (or one)."""
    if x_q.dtype != FP8_DTYPE or w_q.dtype != FP8_DTYPE:
        raise TypeError(f"float8_e4m3fn operands expected, got {x_q.dtype} and {w_q.dtype}")
    k = x_q.shape[-1]
    n = w_q.shape[0]
    if w_q.shape != (n, k):
        raise ValueError(f"weight shape {tuple(w_q.shape)} does not match K = {k}")
    a = x_q.reshape(-1, k).contiguous()
    m = a.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m:
        cfg = config or fp8_config(m)
        s_x = _per_row(x_scale, m, "x_scale")
        s_w = _per_row(w_scale, n, "w_scale")
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n))
        _fp8_kernel[grid](
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


def fp8_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """An fp8 W8A8 Linear with dynamic per-token activations: quantize x to e4m3, fp8 GEMM;
    y in x's dtype."""
    x_q, x_scale = quantize_per_token_fp8(x)
    return fp8_matmul(x_q, x_scale, w_q, w_scale, bias, out_dtype=x.dtype)


# ------------------------------------------------------------------ where it runs
@dataclass(frozen=True)
class Fp8Support:
    """Whether the fp8 kernels run on a device; false with the reason. Truthy when they do."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def fp8_supported(device: torch.device | str | None = None) -> Fp8Support:
    """Can `fp8_linear` run on `device` (default: the current CUDA device)? Compiled kernels
    need an NVIDIA GPU of compute capability ≥ 8.9; under TRITON_INTERPRET=1 a small probe
    checks that this Triton's interpreter runs them and gives the reference's numbers."""
    if interpreting():
        return _interpreter_probe()
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        return Fp8Support(False, f"compiled Triton kernels run on CUDA devices, not {dev.type} (TRITON_INTERPRET=1 runs them on CPU)")
    if not torch.cuda.is_available():
        return Fp8Support(False, "no CUDA device")
    if torch.version.hip:
        # MI300's fp8 is e4m3fnuz (another bias and NaN), not the e4m3fn QuantizedLinear stores
        return Fp8Support(False, "ROCm: these kernels are written and tested for NVIDIA's e4m3fn only")
    major, minor = torch.cuda.get_device_capability(dev)
    name = torch.cuda.get_device_name(dev)
    if (major, minor) < (8, 9):
        return Fp8Support(False, f"{name} is compute capability {major}.{minor}: fp8 tensor cores need 8.9 or newer (Ada, Hopper)")
    return Fp8Support(True, f"{name}, compute capability {major}.{minor}")


@functools.lru_cache(maxsize=1)
def _interpreter_probe() -> Fp8Support:
    """One small quantization and GEMM through the interpreter, against the references."""
    from quantcore.kernels.reference import fp8_w8a8_reference, quantize_per_token_fp8_reference

    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 40, generator=g)
        w_q = (torch.randn(16, 40, generator=g) * 30).to(FP8_DTYPE)
        q, s = quantize_per_token_fp8(x)
        q_ref, s_ref = quantize_per_token_fp8_reference(x)
        if not (torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)):
            return Fp8Support(False, "the interpreter's per-token e4m3 codes differ from PyTorch's")
        y = fp8_matmul(q, s, w_q, torch.ones(1)).double()
        expect = fp8_w8a8_reference(q, s, w_q, torch.ones(1), out_dtype=torch.float64)
        if not (y - expect).norm() <= 1e-5 * expect.norm():  # float32 sums of exact products
            return Fp8Support(False, "the interpreter's fp8 tl.dot differs from the float64 reference")
    except Exception as exc:  # an interpreter without fp8 support fails in many ways; report which
        return Fp8Support(False, f"the Triton interpreter cannot run fp8 kernels: {type(exc).__name__}: {exc}")
    return Fp8Support(True, f"Triton {triton.__version__} interpreter (fp8 codes handled as uint8 in NumPy)")
