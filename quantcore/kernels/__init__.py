"""Kernels for quantized execution, each beside a plain-PyTorch reference.

    w4a16      Triton: int4 group-wise weights x fp16/bf16/fp32 activations (GEMM, split-K GEMV)
    w8a8       Triton: int8 x int8 GEMM with a per-token x per-channel scale epilogue, and the
               per-token int8 activation quantization
    fp8        Triton: the same for float8 e4m3 (fp8-rtn weights, per-token e4m3 activations,
               float32 accumulation); needs compute capability ≥ 8.9, see `fp8_supported`
    w4a4_lowrank  Triton: SVDQuant's W4A4 layer (`LowRankQuantizedLinear`) as Nunchaku runs it:
               smoothing, int4 group-wise activation quantization and the low-rank
               down-projection in one pass over x; the int8-MMA GEMM of the 4-bit codes with
               the up-projection and bias in its epilogue
    cpu        C++ (compiled on first use): int4 GEMV for decode, one-pass int4 dequantization,
               and the per-token steps around fbgemm's int8 matmul; used by
               `quantcore.modules.cpu_paths`
    reference  what each kernel computes, in PyTorch (needs no Triton)

Importing this package does not import Triton: callers ask `triton_available()` first and
import `quantcore.kernels.w4a16` / `.w8a8` / `.fp8` / `.w4a4_lowrank` only then. Triton reads
TRITON_INTERPRET when a kernel is defined, so to run the kernels on CPU through its
interpreter, set it before importing those modules.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors, in NumPy, one program at a time."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """Triton is installed and has somewhere to run: a CUDA device, or its CPU interpreter."""
    try:
        import triton  # noqa: F401  (kernels are defined on import of their modules, not here)
    except ImportError:
        return False
    if interpreting():
        return True
    import torch

    return torch.cuda.is_available()
