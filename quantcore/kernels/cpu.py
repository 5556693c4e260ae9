"""CPU kernels in C++: W4A16 for decode-sized batches on the artifact's packed buffers, and
the per-token steps around fbgemm's int8 matmul.

W4A16.

PyTorch's own packed-int4 CPU matmul measured 5-50x slower than fp32 on our machines, and
dequantizing the whole weight for every token reads 8x the bytes the int4 codes hold. At
decode (a few rows of x) the matmul is bound by reading the weight, so this kernel reads
the packed codes once and never materializes Ŵ:

    y[m, n] = Σ_g S[n, g] · ( Σ_{k∈g} x[m, k] · u[n, k]  −  Z'[n, g] · Σ_{k∈g} x[m, k] )

with u the stored unsigned code and Z' its zero (Z for asymmetric grids, 8 for symmetric:
`quantcore.kernels.reference`). x is split into its even and odd columns first, so the
inner loop multiplies contiguous floats by the low and high nibbles of contiguous bytes,
which AVX-512 (16 lanes) or AVX2 (8 lanes) multiplies in float, converting each byte's
nibbles once for all rows of x; other CPUs take the scalar loop. Rows n are shared among
torch's threads.

It is compiled on first use with torch's cpp_extension (a C++ compiler is needed), into a
cache folder keyed by the source and the CPU's instruction-set flags, because it is built
for the CPU it runs on (-march=native). `available()` says whether it could be built.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 8  # above this many rows of x, dequantizing blocks of Ŵ for the BLAS matmul wins

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

constexpr int64_t kMaxRows = 8;

// The extension shares torch's OpenMP runtime (the same libgomp.so.1, loaded first by torch),
// but OpenMP's thread count is per calling thread: a request served on another thread than
// the one torch.set_num_threads ran on would otherwise use every core.
static inline void follow_torch_threads() {
#ifdef _OPENMP
  omp_set_num_threads(at::get_num_threads());
#endif
}

#if defined(__AVX512F__)
  #define QF_LANES 16
  typedef __m512 vfloat;
  static inline vfloat vzero() { return _mm512_setzero_ps(); }
  static inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
  static inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vfloat vset(float v) { return _mm512_set1_ps(v); }
  static inline vfloat _add(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
  static inline float vsum(vfloat v) { return _mm512_reduce_add_ps(v); }
  // 16 bytes -> the low and the high nibbles as 16 floats each
  static inline void nibbles(const uint8_t* b, vfloat& lo, vfloat& hi) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  #define QF_LANES 8
  typedef __m256 vfloat;
  static inline vfloat vzero() { return _mm256_setzero_ps(); }
  static inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
  static inline vfloat vfma(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vfloat vset(float v) { return _mm256_set1_ps(v); }
  static inline vfloat _add(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
  static inline float vsum(vfloat v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
  }
  static inline void nibbles(const uint8_t* b, vfloat& lo, vfloat& hi) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  }
#endif

// One row n of the weight against M rows of x (M a compile-time constant, so that the
// accumulators live in registers). Low and high nibbles accumulate separately: two
// independent FMA chains per row of x.
template <int M>
static inline void row_dot(const uint8_t* row, const float* xe, const float* xo, const float* xsum,
                           const float* s_row, const float* z_row, int64_t G, int64_t half_group, int64_t half_k,
                           float* total) {
#ifdef QF_LANES
  vfloat scaled[M];
  for (int m = 0; m < M; ++m) scaled[m] = vzero();
#endif
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* b = row + g * half_group;
    const int64_t base = g * half_group;
    int64_t j = 0;
#ifdef QF_LANES
    vfloat dot_lo[M], dot_hi[M];
    for (int m = 0; m < M; ++m) { dot_lo[m] = vzero(); dot_hi[m] = vzero(); }
    for (; j + QF_LANES <= half_group; j += QF_LANES) {
      vfloat lo, hi;
      nibbles(b + j, lo, hi);  // converted once, used for every row of x
      for (int m = 0; m < M; ++m) {
        dot_lo[m] = vfma(lo, vload(xe + m * half_k + base + j), dot_lo[m]);
        dot_hi[m] = vfma(hi, vload(xo + m * half_k + base + j), dot_hi[m]);
      }
    }
    const vfloat s = vset(s_row[g]);
    for (int m = 0; m < M; ++m) scaled[m] = vfma(_add(dot_lo[m], dot_hi[m]), s, scaled[m]);
#endif
    for (; j < half_group; ++j) {  // what the vector loop left
      for (int m = 0; m < M; ++m) {
        total[m] += s_row[g] * (xe[m * half_k + base + j] * (float)(b[j] & 15) +
                                xo[m * half_k + base + j] * (float)(b[j] >> 4));
      }
    }
    for (int m = 0; m < M; ++m) total[m] -= s_row[g] * z_row[g] * xsum[m * G + g];
  }
#ifdef QF_LANES
  for (int m = 0; m < M; ++m) total[m] += vsum(scaled[m]);
#endif
}

// x: (M, K) float32 contiguous, M <= kMaxRows; qweight: N*K/2 bytes (row n at n*K/2);
// scales, zeros: (N, G) float32 (zeros = Z', the code of 0.0); bias: (N,) or empty. -> (M, N)
torch::Tensor w4a16_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                         torch::Tensor zeros, torch::Tensor bias) {
  follow_torch_threads();
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0), G = scales.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "1 to ", kMaxRows, " rows");
  const int64_t group = K / G, half_group = group / 2, half_k = K / 2;
  // the even and the odd columns of x, per row, and the sum of x over each group
  std::vector<float> xe(M * half_k), xo(M * half_k), xsum(M * G);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < half_k; ++j) {
      xe[m * half_k + j] = xp[m * K + 2 * j];
      xo[m * half_k + j] = xp[m * K + 2 * j + 1];
    }
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += xp[m * K + k];
      xsum[m * G + g] = s;
    }
  }
  auto out = torch::empty({M, N}, x.options());
  float* yp = out.data_ptr<float>();
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float total[kMaxRows] = {0.f};
      const uint8_t* row = wp + n * half_k;
      const float* s_row = sp + n * G;
      const float* z_row = zp + n * G;
      switch (M) {
#define QF_ROWS(R) case R: row_dot<R>(row, xe.data(), xo.data(), xsum.data(), s_row, z_row, G, half_group, half_k, total); break;
        QF_ROWS(1) QF_ROWS(2) QF_ROWS(3) QF_ROWS(4) QF_ROWS(5) QF_ROWS(6) QF_ROWS(7) QF_ROWS(8)
#undef QF_ROWS
      }
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = bp ? total[m] + bp[n] : total[m];
    }
  });
  return out;
}

// Ŵ (N, K) float32 = (u - Z') * S, for inputs too large for w4a16_gemv (prefill): one pass
// over the codes, the BLAS matmul then does the arithmetic.
torch::Tensor w4_dequantize(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t K) {
  follow_torch_threads();
  const int64_t N = scales.size(0), G = scales.size(1), group = K / G, half_k = K / 2;
  auto out = torch::empty({N, K}, scales.options());
  float* wp = out.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = zeros.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = qp + n * half_k;
      float* w = wp + n * K;
      for (int64_t g = 0; g < G; ++g) {  // groups are even-sized: a byte never straddles two
        const float s = sp[n * G + g], z = zp[n * G + g];
        #pragma omp simd
        for (int64_t j = g * group / 2; j < (g + 1) * group / 2; ++j) {
          w[2 * j] = ((float)(row[j] & 15) - z) * s;
          w[2 * j + 1] = ((float)(row[j] >> 4) - z) * s;
        }
      }
    }
  });
  return out;
}

// y = x Ŵᵀ (+ bias) for many rows of x (prefill): Ŵ dequantized a block of output rows at a
// time into a small buffer that stays in cache, each block one BLAS matmul. Dequantizing the
// whole weight at once would write (and page-fault in) 4 bytes per weight on every call.
torch::Tensor w4a16_blocked(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                            torch::Tensor zeros, torch::Tensor bias, int64_t block) {
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(0), G = scales.size(1);
  auto out = torch::empty({M, N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n1 = std::min(N, n0 + block);
    auto tile = w4_dequantize(qweight.narrow(0, n0 * K / 2, (n1 - n0) * K / 2), scales.narrow(0, n0, n1 - n0),
                              zeros.narrow(0, n0, n1 - n0), K);
    out.narrow(1, n0, n1 - n0).copy_(at::mm(x, tile.t()));
  }
  if (bias.numel()) out.add_(bias);
  return out;
}

// W8A8: per-token symmetric int8 codes and S_x = max|x|/127 per row (1 for an all-zero row),
// with the same float operations as the PyTorch reference: max, one division by 127, one
// per element. Codes are written as float for fbgemm (whose static input quantization then
// stores them exactly) or as int8 for oneDNN.
// Rows per task of the element-wise steps: at least 64K elements, so that decode-sized inputs
// run on the calling thread (starting the OpenMP team costs more than the work).
static inline int64_t rows_per_task(int64_t row_length) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, row_length)); }

// max |x| of a row, and the row's codes nearbyint(x / s) (half to even, as torch.round):
// written out in AVX-512 because GCC leaves the float-to-int8 conversion scalar.
static inline float row_absmax(const float* row, int64_t K) {
  float m = 0.f;
  int64_t k = 0;
#if defined(__AVX512F__)
  __m512 vm = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) vm = _mm512_max_ps(vm, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
  m = _mm512_reduce_max_ps(vm);
#endif
  for (; k < K; ++k) m = std::max(m, std::fabs(row[k]));
  return m;
}

template <typename Code>
static inline void row_to_codes(const float* row, float s, Code* out, int64_t K) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(s);
  for (; k + 16 <= K; k += 16) {
    const __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if constexpr (std::is_same_v<Code, float>) {
      _mm512_storeu_ps(out + k, q);
    } else {  // |q| ≤ 127 already; the saturating narrow is only the conversion
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q)));
    }
  }
#endif
  for (; k < K; ++k) out[k] = static_cast<Code>(std::nearbyint(row[k] / s));
}

template <typename Code>
static void row_codes(const torch::Tensor& x, bool per_token, Code* cp, float* sp) {
  const int64_t M = x.size(0), K = x.size(1);
  const float* xp = x.data_ptr<float>();
  if (!per_token) {
    const float m = row_absmax(xp, M * K);
    sp[0] = m / 127.f > 0.f ? m / 127.f : 1.f;
  }
  at::parallel_for(0, M, rows_per_task(K), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * K;
      float s = sp[0];
      if (per_token) {
        const float m = row_absmax(row, K);
        s = m / 127.f > 0.f ? m / 127.f : 1.f;
        sp[r] = s;
      }
      row_to_codes(row, s, cp + r * K, K);
    }
  });
}

std::vector<torch::Tensor> int8_row_codes(torch::Tensor x, bool per_token) {
  follow_torch_threads();
  auto codes = torch::empty_like(x);
  auto scales = torch::empty({per_token ? x.size(0) : 1, 1}, x.options());
  row_codes<float>(x, per_token, codes.data_ptr<float>(), scales.data_ptr<float>());
  return {codes, scales};
}

void scale_rows_add_bias(torch::Tensor y, torch::Tensor scales, torch::Tensor bias);

// W8A8 on oneDNN (CPUs with AMX): the codes, oneDNN's int8 matmul (s8 x s8, int32 sums, times
// S_w per channel in fp32) and the per-token epilogue in one call from Python. The matmul is
// called through the dispatcher rather than from Python because at decode sizes Python's
// own cost per op call is a large part of the whole layer's time.
torch::Tensor int8_linear_onednn(torch::Tensor x_in, torch::Tensor packed, torch::Tensor w_scale,
                                 torch::Tensor w_zero, torch::Tensor bias, bool per_token) {
  follow_torch_threads();
  const int64_t K = x_in.size(-1);
  auto x = x_in.reshape({-1, K});
  if (x.scalar_type() != torch::kFloat || !x.is_contiguous()) x = x.to(torch::kFloat).contiguous();
  auto codes = torch::empty({x.size(0), K}, x.options().dtype(torch::kInt8));
  auto scales = torch::empty({per_token ? x.size(0) : 1, 1}, x.options());
  row_codes<int8_t>(x, per_token, codes.data_ptr<int8_t>(), scales.data_ptr<float>());
  // qlinear_pointwise(qx, x_scale, x_zero_point, qw, w_scale, w_zero_point, bias, output_scale,
  //                   output_zero_point, output_dtype, post_op_name, post_op_args, post_op_algorithm),
  // called typed: a boxed call builds a stack of IValues (strings, a list) on every call
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("onednn::qlinear_pointwise", "")
      .typed<at::Tensor(at::Tensor, double, int64_t, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, double,
                        int64_t, std::optional<at::ScalarType>, c10::string_view, c10::List<std::optional<at::Scalar>>,
                        c10::string_view)>();  // the registered kernel's own signature, to the letter
  static const c10::List<std::optional<at::Scalar>> no_args;
  auto y = op.call(codes, 1.0, 0, packed, w_scale, w_zero, std::nullopt, 1.0, 0, at::kFloat, "none", no_args, "");
  scale_rows_add_bias(y, scales, bias);
  if (x_in.dim() != 2) {
    auto sizes = x_in.sizes().vec();
    sizes.back() = y.size(1);
    y = y.view(sizes);
  }
  return x_in.scalar_type() == torch::kFloat ? y : y.to(x_in.scalar_type());
}

// y[m, n] = y[m, n] * s[m] (+ bias[n]), in place: two roundings, as y.mul_(s).add_(bias).
void scale_rows_add_bias(torch::Tensor y, torch::Tensor scales, torch::Tensor bias) {
  follow_torch_threads();
  const int64_t M = y.size(0), N = y.size(1);
  const bool per_row = scales.numel() > 1;
  float* yp = y.data_ptr<float>();
  const float* sp = scales.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, M, rows_per_task(N), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float s = sp[per_row ? m : 0];
      float* row = yp + m * N;
      if (bp) {
        for (int64_t n = 0; n < N; ++n) row[n] = row[n] * s + bp[n];  // no FMA: -ffp-contract=off
      } else {
        for (int64_t n = 0; n < N; ++n) row[n] = row[n] * s;
      }
    }
  });
}
"""

_lock = threading.Lock()
_module = None
_failed: str | None = None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _build_dir() -> Path:
    key = hashlib.sha256((_SOURCE + " ".join(sorted(cpu_flags())) + torch.__version__).encode()).hexdigest()[:16]
    root = Path(os.environ.get("QFORGE_CACHE_DIR", Path.home() / ".cache" / "qforge")).expanduser()
    folder = root / "kernels" / f"cpu_kernels-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _load():
    """The compiled module, built on the first call (about a minute on 2 cores), or None."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load_inline

                log.info("compiling the CPU kernels (once per machine kind)")
                _module = load_inline(
                    name="qforge_cpu_kernels", cpp_sources=[_SOURCE], functions=["w4a16_gemv", "w4_dequantize", "w4a16_blocked", "int8_row_codes", "scale_rows_add_bias", "int8_linear_onednn"],
                    extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"], extra_ldflags=["-fopenmp"], build_directory=str(_build_dir()),
                    verbose=False,
                )
            except Exception as exc:  # no compiler, or a failed build: layers keep the reference path
                _failed = f"{type(exc).__name__}: {exc}"
                log.warning("the CPU kernels are unavailable (%s); int4 and int8 layers keep the reference path", _failed)
    return _module


def load():
    """The compiled module (built on first use); RuntimeError when it cannot be built."""
    module = _load()
    if module is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {_failed}")
    return module


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _failed
