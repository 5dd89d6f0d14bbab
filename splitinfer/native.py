"""A hand-written C++ kernel for the one TEE step that neither eager PyTorch nor inductor runs in one pass: ours'
softmax hop, where the scores come back in their masks' order (`schemes.Matrix.softmax_hop`).

Its steps make five passes over the n² scores (unscale and hide, softmax, the probabilities' rows and columns
gathered, the next masks' scales), and inductor's one kernel for them kept a float32 copy of the scores and took
each exp twice (tee_gpu/README.md, "Twenty-ninth round"). This kernel takes one output row at a time: it reads
its source row once, unscales and hides it, takes the softmax with one exp per score, and writes the row in the
next matmul's column order with its scales, all in float32 in the cache (prefetching the source row after next,
which the masks' random row order hides from the hardware's prefetcher). Built with the machine's own compiler
for the machine's own CPU (`-march=native`: the TEE runs where it is built), once per source and machine (torch's
extension cache, `TORCH_EXTENSIONS_DIR`), and only where compiled kernels are on; set-up times it against the
steps at each shape and keeps the faster (`kernels.pick`). Where it cannot be built (no compiler or ninja), the
steps run, with one warning, and the JSON lists why (`tee_kernels_failed`).
"""
from __future__ import annotations

import functools
import re
import sys

import torch

from splitinfer import kernels
from splitinfer.tee_ops import BLOCKED

NAME = "ours_softmax_hop (C++)"  # as `kernels.failed` and the warning name it
DTYPES = (torch.float16, torch.float32)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

// float16 rows to and from float32 with F16C, 8 values at a time: GCC 12 has no vector type for _Float16 without
// AVX512-FP16, and would convert one value at a time
static inline const float* as_float(const _Float16* x, float* into, int64_t m) {
  int64_t j = 0;
#ifdef __F16C__
  for (; j + 8 <= m; j += 8)
    _mm256_storeu_ps(into + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j))));
#endif
  for (; j < m; ++j) into[j] = static_cast<float>(x[j]);
  return into;
}
static inline const float* as_float(const float* x, float*, int64_t) { return x; }
static inline void store(_Float16* out, const float* x, int64_t m) {
  int64_t j = 0;
#ifdef __F16C__
  for (; j + 8 <= m; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; j < m; ++j) out[j] = static_cast<_Float16>(x[j]);
}
static inline void store(float* out, const float* x, int64_t m) { std::memcpy(out, x, m * sizeof(float)); }

// exp(x) for x <= 0, in vector registers: 2^n 2^f, 2^f by its series to degree 6 (relative error under 2e-7,
// against float16's 5e-4); 0 below -87, where float32's own exp underflows, so that a hidden key weighs exactly 0
#pragma omp declare simd
static inline float exp_nonpositive(float x) {
  const float t = x * 1.44269504088896341f;
  const float n = __builtin_nearbyintf(t);
  const float f = (t - n) * 0.693147180559945309f;
  const float p = 1.0f + f * (1.0f + f * (0.5f + f * (0.166666667f + f * (0.0416666667f + f * (0.00833333333f
                  + f * 0.00138888889f)))));
  const int bits = (static_cast<int>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.0f ? 0.0f : p * two_n;
}

// out[r, j] = softmax(hide(c[src, :] / d1[src] / d3[g, :]))[cols[g, j]] * next_d1[r] * next_d2[g, j], src = a_rows[r],
// g = r's group: rows_per_group rows of m scores each share the group's key scales, key positions and column order.
// Rows begin to end; every argument a value, so that the compiler keeps them in registers across the stores
// (an __m128i store may alias anything, and would make it reload what a closure holds by reference).
template <typename T>
static void hop_rows(int64_t begin, int64_t end, const T* c, const T* d1, const float* inv_d3, const int32_t* rows_at,
                     const int32_t* keys, const int64_t* a_rows, const int32_t* cols, const T* next_d1,
                     const float* next_d2, T* out, int64_t rows_per_group, int64_t m, float blocked) {
  std::vector<float> row(m), probs(m), permuted(m);
  float* p = probs.data();
  float* q = permuted.data();
  for (int64_t r = begin; r < end; ++r) {
    const int64_t g = r / rows_per_group, src = a_rows[r];
    if (r + 2 < end) {  // the source row after next: rows come in the masks' random order, which no prefetcher guesses
      const char* ahead = reinterpret_cast<const char*>(c + a_rows[r + 2] * m);
      for (int64_t byte = 0; byte < m * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(ahead + byte);
    }
    const float* x = as_float(c + src * m, row.data(), m);
    const float* inv = inv_d3 + g * m;
    const int32_t* key = keys + g * m;
    const int32_t at = rows_at[src];
    const float inv_d1 = 1.0f / static_cast<float>(d1[src]);
    #pragma omp simd
    for (int64_t j = 0; j < m; ++j) p[j] = key[j] > at ? blocked : x[j] * inv_d1 * inv[j];
    float most = -3.0e38f;
    #pragma omp simd reduction(max:most)
    for (int64_t j = 0; j < m; ++j) most = p[j] > most ? p[j] : most;
    float sum = 0.0f;
    #pragma omp simd reduction(+:sum)
    for (int64_t j = 0; j < m; ++j) {
      const float e = exp_nonpositive(p[j] - most);
      p[j] = e;
      sum += e;
    }
    const float row_scale = static_cast<float>(next_d1[r]) / sum;
    const int32_t* col = cols + g * m;
    const float* col_scale = next_d2 + g * m;
    #pragma omp simd
    for (int64_t j = 0; j < m; ++j) q[j] = p[col[j]] * row_scale * col_scale[j];
    store(out + r * m, q, m);
  }
}

template <typename T>
static void hop(const T* c, const T* d1, const T* d3, const int32_t* rows_at, const int32_t* keys,
                const int64_t* a_rows, const int32_t* cols, const T* next_d1, const T* next_d2, T* out,
                int64_t groups, int64_t rows_per_group, int64_t m, float blocked) {
  std::vector<float> inv_d3(groups * m), d2(groups * m);
  for (int64_t i = 0; i < groups * m; ++i) {
    inv_d3[i] = 1.0f / static_cast<float>(d3[i]);
    d2[i] = static_cast<float>(next_d2[i]);
  }
  const float* inv = inv_d3.data();
  const float* scales = d2.data();
  at::parallel_for(0, groups * rows_per_group, 16, [=](int64_t begin, int64_t end) {
    hop_rows<T>(begin, end, c, d1, inv, rows_at, keys, a_rows, cols, next_d1, scales, out, rows_per_group, m, blocked);
  });
}

torch::Tensor ours_softmax_hop(torch::Tensor c, torch::Tensor d1, torch::Tensor d3, torch::Tensor rows_at,
                               torch::Tensor keys, torch::Tensor a_rows, torch::Tensor cols, torch::Tensor next_d1,
                               torch::Tensor next_d2, torch::Tensor out, double blocked) {
  for (const auto& t : {c, d1, d3, rows_at, keys, a_rows, cols, next_d1, next_d2, out})
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "ours_softmax_hop takes contiguous CPU tensors");
  TORCH_CHECK(rows_at.scalar_type() == at::kInt && keys.scalar_type() == at::kInt && cols.scalar_type() == at::kInt
              && a_rows.scalar_type() == at::kLong, "ours_softmax_hop: int32 positions and columns, int64 rows");
  const int64_t m = c.size(-1), groups = d3.numel() / m, rows_per_group = c.numel() / m / groups;
  TORCH_CHECK(out.numel() == c.numel() && a_rows.numel() == c.numel() / m && cols.numel() == groups * m,
              "ours_softmax_hop: shapes do not match");
  if (c.scalar_type() == at::kHalf) {
    using H = _Float16;
    hop<H>(reinterpret_cast<const H*>(c.data_ptr()), reinterpret_cast<const H*>(d1.data_ptr()),
           reinterpret_cast<const H*>(d3.data_ptr()), rows_at.data_ptr<int32_t>(), keys.data_ptr<int32_t>(),
           a_rows.data_ptr<int64_t>(), cols.data_ptr<int32_t>(), reinterpret_cast<const H*>(next_d1.data_ptr()),
           reinterpret_cast<const H*>(next_d2.data_ptr()), reinterpret_cast<H*>(out.data_ptr()), groups,
           rows_per_group, m, static_cast<float>(blocked));
  } else {
    TORCH_CHECK(c.scalar_type() == at::kFloat, "ours_softmax_hop takes float16 or float32 scores");
    hop<float>(c.data_ptr<float>(), d1.data_ptr<float>(), d3.data_ptr<float>(), rows_at.data_ptr<int32_t>(),
               keys.data_ptr<int32_t>(), a_rows.data_ptr<int64_t>(), cols.data_ptr<int32_t>(), next_d1.data_ptr<float>(),
               next_d2.data_ptr<float>(), out.data_ptr<float>(), groups, rows_per_group, m, static_cast<float>(blocked));
  }
  return out;
}
"""


@functools.cache
def _built():
    """The extension module, built on first use (about 20 s; then loaded from the cache), or None where it cannot
    be (`kernels.failed` says why)."""
    print("building the TEE's C++ kernel for ours' softmax hop (once per machine)", file=sys.stderr, flush=True)
    try:
        from torch.utils.cpp_extension import load_inline
        # a build per torch version, each against its own headers (a machine may hold two, as the VM does); OpenMP
        # for at::parallel_for (torch's own runtime, already loaded), which without it runs on one thread
        return load_inline(f"splitinfer_native_{re.sub(r'[^0-9a-zA-Z]', '_', torch.__version__)}", cpp_sources=SOURCE,
                           functions=["ours_softmax_hop"], extra_ldflags=["-fopenmp"], verbose=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"])
    except Exception as e:  # no compiler, no ninja, a failed build: the steps run instead
        lines = str(e).strip().splitlines()
        kernels.failed[NAME] = lines[-1] if lines else type(e).__name__
        return None


def offered(t: torch.Tensor) -> bool:
    """Whether the kernel is a form of the hop for scores like `t`: where compiled kernels are on, in float16 or
    float32, unless it failed to build. It is built at its first call, in set-up's choice of form (`kernels.pick`)."""
    return kernels.on() and t.dtype in DTYPES and NAME not in kernels.failed


def ours_softmax_hop(c5: torch.Tensor, d1: torch.Tensor, d3: torch.Tensor, rows_at: torch.Tensor, keys: torch.Tensor,
                     a_rows: torch.Tensor, cols: torch.Tensor, next_d1: torch.Tensor, next_d2: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """The probabilities of ours' scores c5 [B, G, R, n, m], kept in their masks' order (unscaled by d1 [B, G, R, n]
    and d3 [B, G, m], keys at positions `keys` [B, G, m] past a row's position `rows_at` [B, G, R, n] hidden),
    protected for P·V: rows gathered by `a_rows` (flat over all rows), columns by `cols` [B, G, m], scaled by
    next_d1 down the rows and next_d2 along them; into `out` (c5's shape, contiguous), which it returns. A
    RuntimeError where the kernel cannot be built (set-up's choice then leaves this form out, with a warning)."""
    module = _built()
    if module is None:
        raise RuntimeError(f"{NAME} could not be built: {kernels.failed[NAME]}")
    return module.ours_softmax_hop(c5, d1.contiguous(), d3.contiguous(), rows_at.contiguous(), keys.contiguous(),
                                   a_rows, cols.to(torch.int32).contiguous(), next_d1.contiguous(),
                                   next_d2.contiguous(), out, BLOCKED)
