"""Hand-written C++ kernels for the TEE's two softmaxes, which neither eager PyTorch nor inductor runs in one pass,
for ours' permutations of a matmul's operands, for ours' hops into a linear, for otp's hops into a linear and into
the scores, and for the plain split's small ops.

- ours' softmax hop, where the scores come back in their masks' order (`schemes.Matrix.softmax_hop`). Its steps make
  five passes over the n² scores (unscale and hide, softmax, the probabilities' rows and columns gathered, the next
  masks' scales); inductor's one kernel for them kept a float32 copy of the scores and took each exp twice
  (tee_gpu/ROUNDS.md, "Twenty-ninth round"). This one takes an output row at a time: it reads its source row once
  (prefetching the one after next, which the masks' random row order hides from the hardware), unscales and hides
  it, takes the softmax with one exp a score, and writes the row in the next matmul's column order with its
  scales, in float32 in the cache, rounded once. A row of up to 128 keys is permuted in registers; a longer one
  gathers only its visible keys, since a later key weighs exactly 0 (at 512 tokens, float16, on the VM: 0.89-0.91
  of the time to gather every key, per call and inside an inference; "Thirty-eighth round").
- the causal blocks' softmax of the plain split and otp (`tee_ops.CausalBlocks.softmax`): each row read once with
  its row of the bias, one exp a score, written once, every block in one call, 16 values a register. Where no
  sequence is padded the bias is the causal mask alone, and a later key is hidden by its index, the bias unused (at
  512 tokens in float16 on the VM: 0.72 of the last build's time a call in registers, 0.90 of that by index; the
  plain split's softmax inside an inference 3.66 -> 2.60 ms for 2 layers; "Thirty-eighth round").
- the plain split's RMSNorm (with the residual add or without), SiLU·up and RoPE (`tee_ops.RmsNorm.after`,
  `tee_ops.silu_gate`, `tee_ops.apply_rope`): one call each where the eager ops make three to eight and inductor's
  kernel is a compiled call, each row in float32, rounded once. At 128 tokens a GPU host's TEE op costs it far more
  in calls and thread wake-ups than in arithmetic (the twenty-sixth round's H100 host: 10.0 ms of the plain
  split's inference in its TEE ops, about 80); on the VM these took the plain split's TEE ops at 128 tokens from
  3.2-3.3 to 2.5-2.9 ms (2 layers; tee_gpu/ROUNDS.md, "Thirty-third round"). RoPE takes heads of a multiple of 32
  (64 and 128 in the LLaMA shapes) straight from the strided view, each half 16 values a register (at 512 tokens
  in float16 on the VM, 0.24-0.37 of the last build's time, inside an inference too; "Thirty-eighth round").
- ours' masks on a matmul's operands (rows and columns permuted and scaled: `schemes._permute_scale`): both
  operands in one call where the steps make three an operand (an `index_select` of the rows, an integer gather of
  the columns, the scales), each row gathered and scaled in float32 and rounded once, a source row prefetched
  ahead (on the VM, q's and kᵀ's masks at 512 tokens after the caches were flushed: 1.39 ms without, 0.57 with).
  A row of up to 128 values (a head's width: q's and v's) is permuted in registers, where a vector gather loads
  one value at a time (q's masks at 512 tokens, float16: 0.29 -> 0.19 ms on the VM, "Thirty-seventh round").
  The softmax hop's kernel takes v's in the same call, and the RoPE hop's q's and kᵀ's.
- the first half of ours' RoPE hop (`schemes.Matrix.rope_hop`): the qkv answer unmixed and q's and k's heads
  rotated, in two passes (the Woodbury column sums; each row recovered a chunk of whole heads at a time and
  rotated, in registers for heads of a multiple of 32), then the operands' masks.
- ours' hop between two linears (`schemes.Matrix.hop`): the answer unmixed, SiLU·up or the residual sum's RMSNorm,
  the result mixed for the next linear. Inductor's one kernel for it sums the Woodbury and mixing columns down
  rows of a power-of-two width (16384 values for gate/up), which share the cache's sets, and it took 9.2 ms at 512
  tokens on the VM for SiLU's hop, more than ten times the plain split's SiLU. This one reads whole rows in three
  passes (the Woodbury column sums; each row recovered, its op, its mixing scale and its share of the mixing
  sums; each row mixed), on rows cut into one run a thread.
- ours' hop from P·V to the o projection (`schemes.Matrix.attend_hop`): each head's rows unscaled and unpermuted,
  the heads merged and mixed for o, in two passes (each output row gathered head by head, in registers up to 128
  values, a source row prefetched ahead; each row mixed).
- otp's hops between two linears and from the qkv projection to the scores (`schemes.Otp.hop`,
  `schemes.Otp.rope_hop`): the answer recovered with its pad's product, then SiLU·up, the residual sum's RMSNorm, or
  RoPE on q and k, and the next operands padded, a row at a time in float32, rounded once where written. A linear
  input's pad is scaled by its row's RMS, so that hop is one pass; q's and kᵀ's by their whole tensors', so the RoPE
  hop makes two, apart by the team's sums. The steps made eight to twelve eager ops, each a pass over the rows, and
  without inductor a fused hop was those ops in one Python call, which did not pay (tee_gpu/ROUNDS.md,
  "Thirty-fourth round"; "Thirty-fifth round" for these).

Each call starts one team of torch's threads (`in_team`), its passes apart by barriers: on the thirtieth round's H100
host a team's start cost about 45 µs. ours' C++ forms started 20 teams a layer, now 6 (on the VM, a 2-layer 1B-shape
inference with every C++ form in force started 59, now 31, the GPU's stand-in included).

Built with the machine's own compiler for its own CPU (`-march=native`: the TEE runs where it is built), once per
source, machine and torch version (torch's extension cache, `TORCH_EXTENSIONS_DIR`; 33 s on the 2-core VM), and
only where compiled kernels are on or the eager ones are with them (`kernels.CPP`, the default without CUDA); set-up
times each against the forms it would replace at each shape and keeps the fastest (`kernels.pick`). Where they
cannot be built (no compiler, no ninja), set-up leaves them out with a warning, the JSON lists why
(`tee_kernels_failed`), and the other forms run.
"""
from __future__ import annotations

import contextlib
import functools
import re
import sys
from typing import Callable

import torch

from splitinfer import kernels

NAME = "splitinfer.native (C++)"  # as `kernels.failed` and the warnings name the kernels
DTYPES = (torch.float16, torch.float32)
# the plain split's ops and the causal blocks' softmax take bfloat16 too: the TEE-only runner's dtype beside a GPU
ANY_DTYPES = (*DTYPES, torch.bfloat16)
ONE_PASS = "one_pass"  # the kernels' form, where set-up picks between forms (`kernels.pick`)
ONE_PASS_ONE_THREAD = "one_pass_one_thread"  # that form with torch's other threads left waiting

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// 16 values of a row as float32 in one register, and back, rounded as `store` rounds, returning the value stored
// (AVX-512): arithmetic on values as they are read and written, where `as_float` and `store` pass a chunk through a
// buffer first
#ifdef __AVX512F__
static inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
static inline __m512 load16(const at::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
static inline __m512 load16(const at::BFloat16* x) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline __m512 store16(float* out, __m512 v) {
  _mm512_storeu_ps(out, v);
  return v;
}
static inline __m512 store16(at::Half* out, __m512 v) {
  const __m256i halves = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), halves);
  return _mm512_cvtph_ps(halves);
}
static inline __m512 store16(at::BFloat16* out, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i upper = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  upper = _mm512_mask_mov_epi32(upper, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(upper));
  return _mm512_castsi512_ps(_mm512_slli_epi32(upper, 16));
}
#endif

// float16 rows to and from float32 with F16C, 8 values at a time, 16 with AVX-512 (at::Half converts one value at a
// time, in integer arithmetic; GCC 12's _Float16 vectorises only with AVX512-FP16)
static inline const float* as_float(const at::Half* x, float* into, int64_t m) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + 16 <= m; j += 16) _mm512_storeu_ps(into + j, load16(x + j));
#endif
#ifdef __F16C__
  for (; j + 8 <= m; j += 8)
    _mm256_storeu_ps(into + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j))));
#endif
  for (; j < m; ++j) into[j] = static_cast<float>(x[j]);
  return into;
}
static inline const float* as_float(const float* x, float*, int64_t) { return x; }
static inline void store(at::Half* out, const float* x, int64_t m) {
  int64_t j = 0;
#ifdef __AVX512F__
  for (; j + 16 <= m; j += 16) store16(out + j, _mm512_loadu_ps(x + j));
#endif
#ifdef __F16C__
  for (; j + 8 <= m; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; j < m; ++j) out[j] = static_cast<at::Half>(x[j]);
}
static inline void store(float* out, const float* x, int64_t m) { std::memcpy(out, x, m * sizeof(float)); }

// bfloat16 rows to and from float32, 8 values at a time: a bfloat16 is a float32's upper half (at::BFloat16 converts
// one value at a time), rounded to nearest even, a NaN kept a NaN, as at::BFloat16 rounds
static inline const float* as_float(const at::BFloat16* x, float* into, int64_t m) {
  int64_t j = 0;
#ifdef __AVX2__
  for (; j + 8 <= m; j += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j)));
    _mm256_storeu_ps(into + j, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
#endif
  for (; j < m; ++j) into[j] = static_cast<float>(x[j]);
  return into;
}
static inline void store(at::BFloat16* out, const float* x, int64_t m) {
  int64_t j = 0;
#ifdef __AVX2__
  const __m256i half_ulp = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), nan = _mm256_set1_epi32(0x7FC0);
  for (; j + 8 <= m; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    __m256i upper = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(half_ulp, odd)), 16);
    upper = _mm256_blendv_epi8(upper, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // 32-bit lanes to 16: packed within each 128-bit half, then the halves' low quadwords side by side
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(upper, upper), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm256_castsi256_si128(packed));
  }
#endif
  for (; j < m; ++j) out[j] = static_cast<at::BFloat16>(x[j]);
}

// a row of m values fetched into the cache ahead of its use: ours' rows are read in its masks' random order, which no
// hardware prefetcher guesses (on the VM, q's and kᵀ's masks at 512 tokens after the caches were flushed took 1.39
// ms without, 0.57 with)
template <typename T>
static inline void prefetch_row(const T* row, int64_t m) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < m * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(bytes + byte);
}

// f(T*) for the tensor's dtype T, float16 or float32 (a null pointer: only its type counts)
template <typename F>
static void in_dtype(const torch::Tensor& t, const F& f) {
  if (t.scalar_type() == at::kHalf) f(static_cast<at::Half*>(nullptr));
  else f(static_cast<float*>(nullptr));
}

// the same, bfloat16 too: for the plain split's ops and the causal blocks' softmax, which the TEE-only runner runs in
// bfloat16 beside a GPU (ours' kernels take float16 and float32 alone)
template <typename F>
static void in_any_dtype(const torch::Tensor& t, const F& f) {
  if (t.scalar_type() == at::kBFloat16) f(static_cast<at::BFloat16*>(nullptr));
  else in_dtype(t, f);
}

// one thread's place in a team that runs a kernel's passes (`in_team`): the whole team, or one thread alone
struct Member {
  int64_t thread, threads;
  void sync() const {  // every thread of the team waits here for the rest
    if (threads > 1) {
      #pragma omp barrier
    }
  }
  int64_t first(int64_t n) const { return n * thread / threads; }  // this thread's share of n items: first to last
  int64_t last(int64_t n) const { return n * (thread + 1) / threads; }
};

// body(member) on every thread of one OpenMP team of torch's threads, its passes apart by `Member::sync`, rather than a
// team started for each pass (`at::parallel_for`): on the thirtieth round's H100 host a start took 50-130 µs (a
// compiled RMSNorm at 128 tokens, one pass, 0.05-0.13 ms on 16 threads), and ours' hop between linears made five. No
// thread count is given to OpenMP, as torch gives none: a smaller team would end the pool's other threads. Where
// torch runs on one thread, or already in a team, body runs here alone.
template <typename F>
static void in_team(const F& body) {
  if (at::get_num_threads() == 1 || at::in_parallel_region()) {
    body(Member{0, 1});
    return;
  }
  #pragma omp parallel
  body(Member{omp_get_thread_num(), omp_get_num_threads()});
}

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

// p[j] = exp(p[j] - most) for a row of m whose largest value is `most` (found where p was written, in the same
// pass): returns their sum, by which the row's softmax divides
static inline float exp_below(float* p, int64_t m, float most) {
  float sum = 0.0f;
  #pragma omp simd reduction(+:sum)
  for (int64_t j = 0; j < m; ++j) {
    const float e = exp_nonpositive(p[j] - most);
    p[j] = e;
    sum += e;
  }
  return sum;
}

// where rows begin: one stride apart, or at offsets
struct Rows {
  int64_t stride = 0;
  std::vector<int64_t> offsets;  // where the rows are not one stride apart
  int64_t at(int64_t row) const { return offsets.empty() ? row * stride : offsets[row]; }
};

// where each row of t (along its last dimension) begins: one stride apart (dimensions of size 1 aside), or else (a
// transposed view) at offsets found by walking its leading dimensions
static Rows rows_of(const torch::Tensor& t) {
  Rows rows;
  const int64_t dims = t.dim() - 1;
  int64_t expected = -1;
  bool even = true;
  for (int64_t d = dims - 1; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (expected < 0) rows.stride = t.stride(d);
    else even = even && t.stride(d) == expected;
    expected = t.stride(d) * t.size(d);
  }
  if (!even) {
    rows.offsets.resize(t.numel() / t.size(-1));
    for (int64_t i = 0; i < static_cast<int64_t>(rows.offsets.size()); ++i) {
      int64_t rest = i, off = 0;
      for (int64_t d = dims - 1; d >= 0; --d) {
        off += (rest % t.size(d)) * t.stride(d);
        rest /= t.size(d);
      }
      rows.offsets[i] = off;
    }
  }
  return rows;
}

#ifdef __AVX512F__
// out[j] = v[c[j]] * s * cs[j] for j < m, a row of m ≤ 128 values (v, float32) permuted and scaled, rounded to T:
// v held in registers, each 16 indices served by permutes of two registers at a time and blends, where a gather
// loads each value alone (61% of the operands' masks' time on the VM's AMD cores). False where m > 128: none done.
template <typename T>
static inline bool permuted_in_registers(const float* v, const int32_t* c, float s, const float* cs, T* out,
                                         int64_t m) {
  if (m > 128) return false;
  __m512 r[8];
  for (int64_t i = 0; i < 8; ++i) {
    const int64_t left = m - 16 * i;
    r[i] = left >= 16 ? _mm512_loadu_ps(v + 16 * i)
         : left > 0  ? _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1), v + 16 * i)
                     : _mm512_setzero_ps();
  }
  const __m512 by = _mm512_set1_ps(s);
  const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
  for (int64_t j = 0; j < m; j += 16) {
    const int64_t left = m - j;
    const __mmask16 live = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __m512i idx = _mm512_maskz_loadu_epi32(live, c + j);  // index 0 past the row's end
    __m512 x = _mm512_permutex2var_ps(r[0], idx, r[1]);  // by the index's low five bits
    if (m > 32)
      x = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, bit5), x, _mm512_permutex2var_ps(r[2], idx, r[3]));
    if (m > 64) {
      __m512 y = _mm512_permutex2var_ps(r[4], idx, r[5]);
      y = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, bit5), y, _mm512_permutex2var_ps(r[6], idx, r[7]));
      x = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, bit6), x, y);
    }
    const __m512 scaled = _mm512_mul_ps(_mm512_mul_ps(x, by), _mm512_maskz_loadu_ps(live, cs + j));
    if (left >= 16) {
      store16(out + j, scaled);
    } else {
      float rest[16];
      _mm512_storeu_ps(rest, scaled);
      store(out + j, rest, left);
    }
  }
  return true;
}
#endif

// out[r, j] = x[rows[r], cols[g, j]] * row[r] * col[g, j], g = r / rows_per_group: one matmul operand's rows and
// columns permuted and scaled by ours' masks. The row scale is row_scale's value at r, or its reciprocal
// (`row_divides`); col holds the column scales as float32, made per call. Rows of x begin one stride apart, or at
// offsets (a transposed view: `Rows`), their columns col_stride apart.
template <typename T>
static void permute_rows(int64_t begin, int64_t end, const T* x, const Rows& x_rows, int64_t col_stride,
                         const int64_t* rows, const int32_t* cols, const T* row_scale, bool row_divides,
                         const float* col, T* out, int64_t rows_per_group, int64_t m) {
  std::vector<T> picked(m);
  std::vector<float> as_f(m), q(m);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t g = r / rows_per_group;
    if (col_stride == 1 && r + 4 < end) prefetch_row(x + x_rows.at(rows[r + 4]), m);
    const T* src = x + x_rows.at(rows[r]);
    const int32_t* c = cols + g * m;
    const float s = row_divides ? 1.0f / static_cast<float>(row_scale[r]) : static_cast<float>(row_scale[r]);
    const float* cs = col + g * m;
    float* o = q.data();
    if (col_stride == 1) {  // the row converted whole, then permuted in float32 (in registers, or vector gathers)
      const float* v = as_float(src, as_f.data(), m);
#ifdef __AVX512F__
      if (permuted_in_registers(v, c, s, cs, out + r * m, m)) continue;
#endif
      #pragma omp simd
      for (int64_t j = 0; j < m; ++j) o[j] = v[c[j]] * s * cs[j];
    } else {
      T* p = picked.data();
      for (int64_t j = 0; j < m; ++j) p[j] = src[c[j] * col_stride];
      const float* v = as_float(p, as_f.data(), m);
      #pragma omp simd
      for (int64_t j = 0; j < m; ++j) o[j] = v[j] * s * cs[j];
    }
    store(out + r * m, o, m);
  }
}

// matmul operands' masks (`permute_rows`) made before a team runs them (`run`): six tensors a job in turn (x, its
// destination rows' sources, each group's column order, the row scale, the column scale, out) and whether each job's
// row scale divides. A hop's kernel runs them in its own team: the RoPE hop's for q and kᵀ, the softmax hop's for v.
struct Permutes {
  struct Job {
    torch::Tensor x, rows, cols, row_scale, col, out;
    bool row_divides;
    Rows x_rows;
  };
  std::vector<Job> jobs;

  Permutes(const std::vector<torch::Tensor>& t, const std::vector<bool>& divides) {
    TORCH_CHECK(t.size() == 6 * divides.size(), "permute_scales: six tensors a job");
    for (size_t i = 0; i < divides.size(); ++i) {
      const torch::Tensor &x = t[6 * i], &rows = t[6 * i + 1], &cols = t[6 * i + 2], &row_scale = t[6 * i + 3],
                          &col_scale = t[6 * i + 4], &out = t[6 * i + 5];
      TORCH_CHECK(x.device().is_cpu() && out.is_contiguous() && out.scalar_type() == x.scalar_type()
                  && row_scale.scalar_type() == x.scalar_type() && col_scale.scalar_type() == x.scalar_type()
                  && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat),
                  "permute_scales takes CPU tensors, all float16 or all float32, into a contiguous one");
      TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kInt && rows.is_contiguous()
                  && cols.is_contiguous() && row_scale.is_contiguous() && col_scale.is_contiguous(),
                  "permute_scales: int64 rows, int32 columns, contiguous scales");
      const int64_t m = x.size(-1), dest_rows = out.numel() / m, groups = cols.numel() / m;
      TORCH_CHECK(rows.numel() == dest_rows && dest_rows % groups == 0 && col_scale.numel() == groups * m
                  && row_scale.numel() == dest_rows, "permute_scales: shapes do not match");
      // the column scales as float32, made here (a no-op in float32)
      jobs.push_back(Job{x, rows, cols, row_scale, col_scale.to(at::kFloat).contiguous(), out, divides[i], rows_of(x)});
    }
  }

  void run(const Member& me) const {  // me's share of each job's rows
    for (const Job& job : jobs) {
      const int64_t m = job.x.size(-1), dest_rows = job.out.numel() / m, groups = job.cols.numel() / m;
      in_dtype(job.x, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        permute_rows<T>(me.first(dest_rows), me.last(dest_rows), job.x.data_ptr<T>(), job.x_rows, job.x.stride(-1),
                        job.rows.data_ptr<int64_t>(), job.cols.data_ptr<int32_t>(), job.row_scale.data_ptr<T>(),
                        job.row_divides, job.col.data_ptr<float>(), job.out.data_ptr<T>(), dest_rows / groups, m);
      });
    }
  }
};

void permute_scales(std::vector<torch::Tensor> tensors, std::vector<bool> divides) {
  const Permutes permutes(tensors, divides);
  in_team([&](const Member& me) { permutes.run(me); });
}

// out[r, j] = softmax(hide(c[src, :] / d1[src] / d3[g, :]))[cols[g, j]] * next_d1[r] * next_d2[g, j], src = a_rows[r],
// g = r's group: rows_per_group rows of m scores each share the group's key scales, key positions and column order.
// Rows begin to end; every argument a value, so that the compiler keeps them in registers across the stores
// (an __m128i store may alias anything, and would make it reload what a closure holds by reference).
template <typename T>
static void hop_rows(int64_t begin, int64_t end, const T* c, const T* d1, const float* inv_d3, const int32_t* rows_at,
                     const int32_t* keys, const int64_t* a_rows, const int32_t* cols, const int32_t* col_keys,
                     const T* next_d1, const float* next_d2, T* out, int64_t rows_per_group, int64_t m,
                     float blocked) {
  std::vector<float> row(m), probs(m), permuted(m);
  float* p = probs.data();
  float* q = permuted.data();
  for (int64_t r = begin; r < end; ++r) {
    const int64_t g = r / rows_per_group, src = a_rows[r];
    if (r + 2 < end) prefetch_row(c + a_rows[r + 2] * m, m);  // the source row after next
    const float* inv = inv_d3 + g * m;
    const int32_t* key = keys + g * m;
    const int32_t at = rows_at[src];
    const float inv_d1 = 1.0f / static_cast<float>(d1[src]);
    float most = -3.0e38f;
    int64_t j0 = 0;
#ifdef __AVX512F__
    __m512 largest = _mm512_set1_ps(most);
    for (const T* z = c + src * m; j0 + 16 <= m; j0 += 16) {
      const __mmask16 hidden = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(key + j0), _mm512_set1_epi32(at));
      const __m512 v = _mm512_mask_blend_ps(hidden, _mm512_mul_ps(_mm512_mul_ps(load16(z + j0), _mm512_set1_ps(inv_d1)),
                                                                  _mm512_loadu_ps(inv + j0)), _mm512_set1_ps(blocked));
      _mm512_storeu_ps(p + j0, v);
      largest = _mm512_max_ps(largest, v);
    }
    most = _mm512_reduce_max_ps(largest);
#endif
    const float* x = as_float(c + src * m + j0, row.data(), m - j0);  // the rest, from j0
    #pragma omp simd reduction(max:most)
    for (int64_t j = j0; j < m; ++j) {
      p[j] = key[j] > at ? blocked : x[j - j0] * inv_d1 * inv[j];
      most = p[j] > most ? p[j] : most;
    }
    const float row_scale = static_cast<float>(next_d1[r]) / exp_below(p, m, most);
    const int32_t* col = cols + g * m;
    const float* col_scale = next_d2 + g * m;
    int64_t j1 = 0;
#ifdef __AVX512F__
    if (permuted_in_registers(p, col, row_scale, col_scale, out + r * m, m)) continue;  // rows of up to 128
    // gathered, scaled and written in registers: the same operations as below. A key past the row's position weighs
    // exactly 0, so only the others are gathered, unless every key is (then each weighs the same)
    const int32_t* col_key = col_keys + g * m;
    const __m512i position = _mm512_set1_epi32(most > blocked ? at : INT32_MAX);
    for (; j1 + 16 <= m; j1 += 16) {
      const __mmask16 seen = _mm512_cmple_epi32_mask(_mm512_loadu_si512(col_key + j1), position);
      const __m512 x = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), seen, _mm512_loadu_si512(col + j1), p, 4);
      store16(out + r * m + j1, _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(row_scale)),
                                              _mm512_loadu_ps(col_scale + j1)));
    }
#endif
    #pragma omp simd
    for (int64_t j = j1; j < m; ++j) q[j] = p[col[j]] * row_scale * col_scale[j];
    store(out + r * m + j1, q + j1, m - j1);
  }
}

template <typename T>
static void hop(const T* c, const T* d1, const T* d3, const int32_t* rows_at, const int32_t* keys,
                const int64_t* a_rows, const int32_t* cols, const T* next_d1, const T* next_d2, T* out,
                int64_t groups, int64_t rows_per_group, int64_t m, float blocked, const Permutes& permutes) {
  std::vector<float> inv_d3(groups * m), d2(groups * m);
  std::vector<int32_t> col_keys(groups * m);  // the key position of each output column
  for (int64_t i = 0; i < groups * m; ++i) {
    inv_d3[i] = 1.0f / static_cast<float>(d3[i]);
    d2[i] = static_cast<float>(next_d2[i]);
    col_keys[i] = keys[(i / m) * m + cols[i]];
  }
  const float* inv = inv_d3.data();
  const float* scales = d2.data();
  const int64_t rows = groups * rows_per_group;
  in_team([&](const Member& me) {
    hop_rows<T>(me.first(rows), me.last(rows), c, d1, inv, rows_at, keys, a_rows, cols, col_keys.data(), next_d1,
                scales, out, rows_per_group, m, blocked);
    permutes.run(me);
  });
}

// the softmax of each row of packed causal blocks plus its row of the [B, 1, n, n] bias (`tee_ops.CausalBlocks`):
// block r holds [B, H, end_r - start_r, end_r] scores, rows begin to end counted over every block in turn. Where no
// sequence is `padded`, the bias is only the causal mask, so a key past the row is `blocked` by its index instead,
// and the bias's values go unused: the same weights, since either way a later key's exp underflows to exactly 0.
template <typename T>
static void block_rows(int64_t begin, int64_t end, const T* x, const T* bias, T* out, const std::vector<int64_t>& starts,
                       const std::vector<int64_t>& first_row, const std::vector<int64_t>& offset, int64_t heads,
                       bool padded, float blocked) {
  const int64_t n = starts.back();
  std::vector<float> row(n), biases(n), probs(n);
  float* p = probs.data();
  int64_t r = 0;
  for (int64_t g = begin; g < end; ++g) {
    while (g >= first_row[r + 1]) ++r;
    const int64_t m = starts[r + 1], rows = m - starts[r], local = g - first_row[r];
    const int64_t sequence = local / rows / heads, i = starts[r] + local % rows;
    const T *xr = x + offset[r] + local * m, *br = bias + (sequence * n + i) * n;
    T* o = out + offset[r] + local * m;
    float most = -3.0e38f;
    int64_t j0 = 0;
#ifdef __AVX512F__  // 16 values a register: the same operations as the loops below, a pass fewer each way
    __m512 largest = _mm512_set1_ps(most);
    const __m512i keys = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (; j0 + 16 <= m; j0 += 16) {
      const __m512 v = padded ? _mm512_add_ps(load16(xr + j0), load16(br + j0))
                     : _mm512_mask_blend_ps(_mm512_cmpgt_epi32_mask(_mm512_add_epi32(keys, _mm512_set1_epi32(j0)),
                                                                    _mm512_set1_epi32(i)),
                                            load16(xr + j0), _mm512_set1_ps(blocked));
      _mm512_storeu_ps(p + j0, v);
      largest = _mm512_max_ps(largest, v);
    }
    most = _mm512_reduce_max_ps(largest);
#endif
    const float* s = as_float(xr + j0, row.data(), m - j0);  // the rest, from j0
    const float* b = as_float(br + j0, biases.data(), m - j0);
    #pragma omp simd reduction(max:most)
    for (int64_t j = j0; j < m; ++j) {
      p[j] = padded ? s[j - j0] + b[j - j0] : j > i ? blocked : s[j - j0];
      most = p[j] > most ? p[j] : most;
    }
    const float inv = 1.0f / exp_below(p, m, most);
    int64_t j1 = 0;
#ifdef __AVX512F__
    for (; j1 + 16 <= m; j1 += 16) store16(o + j1, _mm512_mul_ps(_mm512_loadu_ps(p + j1), _mm512_set1_ps(inv)));
#endif
    #pragma omp simd
    for (int64_t j = j1; j < m; ++j) p[j] *= inv;
    store(o + j1, p + j1, m - j1);
  }
}

torch::Tensor softmax_blocks(torch::Tensor x, torch::Tensor bias, torch::Tensor out, int64_t batch, int64_t heads,
                             std::vector<int64_t> starts, bool padded, double blocked) {
  for (const auto& t : {x, bias, out})
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu() && t.scalar_type() == x.scalar_type()
                && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat),
                "softmax_blocks takes contiguous CPU tensors, all float16, all bfloat16 or all float32");
  const int64_t n = starts.back(), blocks = static_cast<int64_t>(starts.size()) - 1;
  std::vector<int64_t> first_row(blocks + 1, 0), offset(blocks + 1, 0);
  for (int64_t r = 0; r < blocks; ++r) {
    const int64_t rows = batch * heads * (starts[r + 1] - starts[r]);
    first_row[r + 1] = first_row[r] + rows;
    offset[r + 1] = offset[r] + rows * starts[r + 1];
  }
  TORCH_CHECK(x.numel() == offset[blocks] && out.numel() == x.numel() && bias.numel() == batch * n * n,
              "softmax_blocks: shapes do not match");
  // rows cut into one part a thread with as many scores in each: a later block's rows are longer, and an even cut
  // of the rows gave the last thread most of the work (VM, 32 heads x 512 tokens in float16, two threads: 1.9 ms
  // cut by rows, 1.5 by scores, 2.7 on one thread)
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), first_row[blocks]));
  std::vector<int64_t> split(parts + 1, first_row[blocks]);
  for (int64_t t = 0, r = 0; t < parts; ++t) {
    const int64_t target = offset[blocks] * t / parts;
    while (target >= offset[r + 1]) ++r;
    split[t] = first_row[r] + (target - offset[r]) / starts[r + 1];
  }
  in_any_dtype(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *xs = x.data_ptr<T>(), *bs = bias.data_ptr<T>();
    T* os = out.data_ptr<T>();
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        block_rows<T>(split[t], split[t + 1], xs, bs, os, starts, first_row, offset, heads, padded,
                      static_cast<float>(blocked));
    });
  });
  return out;
}

torch::Tensor ours_softmax_hop(torch::Tensor c, torch::Tensor d1, torch::Tensor d3, torch::Tensor rows_at,
                               torch::Tensor keys, torch::Tensor a_rows, torch::Tensor cols, torch::Tensor next_d1,
                               torch::Tensor next_d2, torch::Tensor out, double blocked,
                               std::vector<torch::Tensor> permute, std::vector<bool> divides) {
  const Permutes permutes(permute, divides);
  for (const auto& t : {c, d1, d3, rows_at, keys, a_rows, cols, next_d1, next_d2, out})
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "ours_softmax_hop takes contiguous CPU tensors");
  TORCH_CHECK(rows_at.scalar_type() == at::kInt && keys.scalar_type() == at::kInt && cols.scalar_type() == at::kInt
              && a_rows.scalar_type() == at::kLong, "ours_softmax_hop: int32 positions and columns, int64 rows");
  const int64_t m = c.size(-1), groups = d3.numel() / m, rows_per_group = c.numel() / m / groups;
  TORCH_CHECK(out.numel() == c.numel() && a_rows.numel() == c.numel() / m && cols.numel() == groups * m,
              "ours_softmax_hop: shapes do not match");
  TORCH_CHECK(c.scalar_type() == at::kHalf || c.scalar_type() == at::kFloat,
              "ours_softmax_hop takes float16 or float32 scores");
  in_dtype(c, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    hop<T>(c.data_ptr<T>(), d1.data_ptr<T>(), d3.data_ptr<T>(), rows_at.data_ptr<int32_t>(), keys.data_ptr<int32_t>(),
           a_rows.data_ptr<int64_t>(), cols.data_ptr<int32_t>(), next_d1.data_ptr<T>(), next_d2.data_ptr<T>(),
           out.data_ptr<T>(), groups, rows_per_group, m, static_cast<float>(blocked), permutes);
  });
  return out;
}

// x rounded to T and back, in place (float16: F16C, 8 values at a time); a no-op in float32
static inline void rounded(float* x, int64_t m, const at::Half*) {
  int64_t j = 0;
#ifdef __F16C__
  for (; j + 8 <= m; j += 8)
    _mm256_storeu_ps(x + j, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT)));
#endif
  for (; j < m; ++j) x[j] = static_cast<float>(static_cast<at::Half>(x[j]));
}
static inline void rounded(float*, int64_t, const float*) {}

// m values of x into `into` as float32
template <typename T>
static inline float* load(float* into, const T* x, int64_t m) {
  const float* v = as_float(x, into, m);
  if (v != into) std::memcpy(into, v, m * sizeof(float));
  return into;
}

// silu(g) = g / (1 + exp(-g)), exp taken of -|g| <= 0 only
#pragma omp declare simd
static inline float silu(float g) {
  const float e = exp_nonpositive(g < 0.0f ? g : -g);
  return g * (g < 0.0f ? e : 1.0f) / (1.0f + e);
}

#ifdef __AVX512F__
// exp_nonpositive and silu, 16 values at a time, in the same operations
static inline __m512 exp16_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.00138888889f), _mm512_set1_ps(0.00833333333f));
  for (const float c : {0.0416666667f, 0.166666667f, 0.5f, 1.0f, 1.0f}) p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(c));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ), e, _mm512_setzero_ps());
}
static inline __m512 silu16(__m512 g) {
  const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 e = exp16_nonpositive(_mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_setzero_ps(), g), g));
  const __m512 numerator = _mm512_mul_ps(g, _mm512_mask_blend_ps(negative, _mm512_set1_ps(1.0f), e));
  return _mm512_div_ps(numerator, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}
#endif

// ours' hops work on rows in groups of ROWS, a chunk of COLUMNS at a time: a group's chunks in float32 stay in the
// core's first-level cache, and each running column sum is read and written once a group
constexpr int64_t ROWS = 4, COLUMNS = 256;

// acc[q, j0 + j] += Σ_i weights[q, r + i] · rows[i][j] for q < k, a chunk of m columns of a group's g rows (a short
// group's missing rows weigh 0, so that every group adds in one loop of four terms)
static inline void add_group(float* acc, int64_t width, int64_t j0, const float* weights, int64_t stride, int64_t k,
                             int64_t r, int64_t g, float (*rows)[COLUMNS], int64_t m) {
  for (int64_t q = 0; q < k; ++q) {
    float w[ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t i = 0; i < g; ++i) w[i] = weights[q * stride + r + i];
    const float *v0 = rows[0], *v1 = rows[g > 1 ? 1 : 0], *v2 = rows[g > 2 ? 2 : 0], *v3 = rows[g > 3 ? 3 : 0];
    float* into = acc + q * width + j0;
    #pragma omp simd
    for (int64_t j = 0; j < m; ++j) into[j] += w[0] * v0[j] + w[1] * v1[j] + w[2] * v2[j] + w[3] * v3[j];
  }
}

// one team of torch's threads that does nothing but wait `barriers` times: what a team costs this CPU
// (`kernel_bench`'s fixed costs)
void empty_team(int64_t barriers) {
  in_team([&](const Member& me) {
    for (int64_t i = 0; i < barriers; ++i) me.sync();
  });
}

// R rows cut into one run a thread, in whole groups (reading rows whole: a column block read down rows of a
// power-of-two width would share the cache's sets)
struct Runs {
  int64_t rows, parts;
  explicit Runs(int64_t r)
      : rows(r), parts(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (r + ROWS - 1) / ROWS))) {}
  int64_t first(int64_t p) const { return p == parts ? rows : (rows / ROWS * p / parts) * ROWS; }
  template <typename F>
  void each(const Member& me, const F& f) const {  // f(part, first row, end row) for each of `me`'s runs
    for (int64_t p = me.thread; p < parts; p += me.threads) f(p, first(p), first(p + 1));
  }
  // sums[0, :] += sums[p, :] for every part p, a row of `width`: once every thread has written its part, `me`'s
  // slice of the columns; then every thread waits for the whole row
  void add_parts(const Member& me, float* sums, int64_t width) const {
    me.sync();
    const int64_t begin = me.first(width), end = me.last(width);
    for (int64_t p = 1; p < parts; ++p) {
      const float* from = sums + p * width;
      #pragma omp simd
      for (int64_t j = begin; j < end; ++j) sums[j] += from[j];
    }
    me.sync();
  }
};

// ours' protect of the next linear's input (`_mix_rows`, no dummy rows) for one sequence, whose rows h a hop has
// written into `kept` (T, D2 wide): each row at unit RMS (h·c, c = d/rms(h)), mixed, h·c + A'·(Bᵀ/D)·(h·c). Where
// there is a `weight` (an RMSNorm's, times √D2), h is kept·weight/rms(kept), and the hop gives its 1/rms.
template <typename T>
struct Mix {
  int64_t R, D2, k;
  const float *d, *a_next, *bt, *weight;
  T *kept, *out;
  float* next_scale;

#ifdef __AVX512F__
  // columns j to j + 16 of row r of h, times cr = c[r], in a register: the same operations as `input`
  __m512 input16(int64_t r, int64_t j, float cr) const {
    const __m512 c16 = _mm512_set1_ps(cr);
    const __m512 by = weight == nullptr ? c16 : _mm512_mul_ps(_mm512_loadu_ps(weight + j), c16);
    return _mm512_mul_ps(load16(kept + r * D2 + j), by);
  }
#endif

  // columns j0 to j0 + m of row r of h, times c[r]
  void input(int64_t r, int64_t j0, int64_t m, const float* c, float* h) const {
    const float cr = c[r];
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= m; i += 16) _mm512_storeu_ps(h + i, input16(r, j0 + i, cr));
#endif
    float* rest = h + i;
    load(rest, kept + r * D2 + j0 + i, m - i);
    if (weight == nullptr) {
      #pragma omp simd
      for (int64_t j = 0; j < m - i; ++j) rest[j] *= cr;
    } else {
      const float* w = weight + j0 + i;
      #pragma omp simd
      for (int64_t j = 0; j < m - i; ++j) rest[j] *= w[j] * cr;
    }
  }

  // a group of g rows from r, once the hop has written them: their scales c from their sums of squares (of h) and
  // their norms' 1/rms (1 where there is no norm); their share of the column sums (Bᵀ/D)·diag(c)·h into acc
  void group(int64_t r, int64_t g, const float* squares, const float* inv_rms, float* c, float* acc) const {
    for (int64_t i = 0; i < g; ++i) {
      const float next = d[r + i] / std::max(inv_rms[i] * std::sqrt(squares[i] / D2), 1e-12f);
      next_scale[r + i] = next;
      c[r + i] = inv_rms[i] * next;
    }
    float rows[ROWS][COLUMNS];
    for (int64_t j0 = 0; j0 < D2; j0 += COLUMNS) {
      const int64_t m = std::min(COLUMNS, D2 - j0);
      for (int64_t i = 0; i < g; ++i) input(r + i, j0, m, c, rows[i]);
      add_group(acc, D2, j0, bt, R, k, r, g, rows, m);
    }
  }

  // rows r0 to r1 mixed, given the column sums `shared`
  void rows(int64_t r0, int64_t r1, const float* shared, const float* c) const {
    float h[COLUMNS];
    for (int64_t r = r0; r < r1; ++r) {
      int64_t j1 = 0;
#ifdef __AVX512F__
      for (; j1 + 16 <= D2; j1 += 16) {  // in registers, the same operations as below
        __m512 v = input16(r, j1, c[r]);
        for (int64_t q = 0; q < k; ++q)
          v = _mm512_fmadd_ps(_mm512_set1_ps(a_next[r * k + q]), _mm512_loadu_ps(shared + q * D2 + j1), v);
        store16(out + r * D2 + j1, v);
      }
#endif
      for (int64_t j0 = j1; j0 < D2; j0 += COLUMNS) {
        const int64_t m = std::min(COLUMNS, D2 - j0);
        input(r, j0, m, c, h);
        for (int64_t q = 0; q < k; ++q) {
          const float aq = a_next[r * k + q];
          const float* sh = shared + q * D2 + j0;
          #pragma omp simd
          for (int64_t j = 0; j < m; ++j) h[j] += aq * sh[j];
        }
        store(out + r * D2 + j0, h, m);
      }
    }
  }

  // `me`'s part of the whole mix, once `produce(r0, r1, acc, c)` has written h's rows r0 to r1 and called `group` on
  // them: sums holds a k·D2 row for each run
  template <typename F>
  void run(const Member& me, const Runs& runs, float* sums, float* c, const F& produce) const {
    runs.each(me, [&](int64_t p, int64_t r0, int64_t r1) {
      float* acc = sums + p * k * D2;
      std::fill(acc, acc + k * D2, 0.0f);
      produce(r0, r1, acc, c);
    });
    runs.add_parts(me, sums, k * D2);
    runs.each(me, [&](int64_t, int64_t r0, int64_t r1) { rows(r0, r1, sums, c); });
  }
};

template <typename T>
static Mix<T> mix_of(int64_t s, int64_t R, int64_t D2, const torch::Tensor& d, const torch::Tensor& a_next,
                     const torch::Tensor& bt, const float* weight, torch::Tensor& kept, torch::Tensor& out,
                     torch::Tensor& next_scale) {
  const int64_t k = a_next.size(-1);
  return Mix<T>{R, D2, k, d.data_ptr<float>() + s * R, a_next.data_ptr<float>() + s * R * k,
                bt.data_ptr<float>() + s * k * R, weight, kept.data_ptr<T>() + s * R * D2,
                out.data_ptr<T>() + s * R * D2, next_scale.data_ptr<float>() + s * R};
}

static void check_mix(const torch::Tensor& d, const torch::Tensor& a_next, const torch::Tensor& bt,
                      const torch::Tensor& out, const torch::Tensor& kept, const torch::Tensor& answer, int64_t S,
                      int64_t R, int64_t D2) {
  for (const auto& t : {d, a_next, bt, out, kept})
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "ours' hops take contiguous CPU tensors");
  for (const auto& t : {d, a_next, bt}) TORCH_CHECK(t.scalar_type() == at::kFloat, "ours' hops: float32 masks");
  TORCH_CHECK(out.scalar_type() == answer.scalar_type() && kept.scalar_type() == answer.scalar_type()
              && (answer.scalar_type() == at::kHalf || answer.scalar_type() == at::kFloat),
              "ours' hops take float16 or float32 answers, and write their dtype");
  const int64_t k = a_next.size(-1);
  TORCH_CHECK(d.numel() == S * R && a_next.numel() == S * R * k && bt.numel() == S * k * R && out.numel() == S * R * D2
              && kept.numel() == S * R * D2, "ours' hops: the mix's shapes do not match");
}

// ours' recovery of a linear's answer for one sequence (`_unmix_rows`): z [R, W], D⁻¹(z − A·G⁻¹BᵀD⁻¹·z) with the
// rows' scales, given Woodbury's k×R rows G⁻¹BᵀD⁻¹ and A [R, k]
template <typename T>
struct Unmix {
  int64_t R, W, k;
  const T* z;
  const float *woodbury, *a, *scale;

  // the Woodbury column sums woodbury · z (k×W) of rows r0 to r1, into acc
  void sums(int64_t r0, int64_t r1, float* acc) const {
    float rows[ROWS][COLUMNS];
    for (int64_t r = r0; r < r1; r += ROWS) {
      const int64_t g = std::min(ROWS, r1 - r);
      for (int64_t j0 = 0; j0 < W; j0 += COLUMNS) {
        const int64_t m = std::min(COLUMNS, W - j0);
        for (int64_t i = 0; i < g; ++i) load(rows[i], z + (r + i) * W + j0, m);
        add_group(acc, W, j0, woodbury, R, k, r, g, rows, m);
      }
    }
  }

  // `me`'s part of every row's column sums, a partial sum a run (parts: a k·W row each), added: the k×W `shared`
  // that `row` takes, at the front of `parts`
  const float* shared(const Member& me, const Runs& runs, float* parts) const {
    runs.each(me, [&](int64_t p, int64_t r0, int64_t r1) {
      float* acc = parts + p * k * W;
      std::fill(acc, acc + k * W, 0.0f);
      sums(r0, r1, acc);
    });
    runs.add_parts(me, parts, k * W);
    return parts;
  }

  // columns j0 to j0 + m of row r recovered, in float32
  void row(int64_t r, int64_t j0, int64_t m, const float* shared, float* y) const {
    const float inv_scale = 1.0f / scale[r];
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= m; i += 16) {  // in registers, the same operations as below
      __m512 v = load16(z + r * W + j0 + i);
      for (int64_t q = 0; q < k; ++q)
        v = _mm512_fnmadd_ps(_mm512_set1_ps(a[r * k + q]), _mm512_loadu_ps(shared + q * W + j0 + i), v);
      _mm512_storeu_ps(y + i, _mm512_mul_ps(v, _mm512_set1_ps(inv_scale)));
    }
#endif
    float* rest = y + i;
    load(rest, z + r * W + j0 + i, m - i);
    for (int64_t q = 0; q < k; ++q) {
      const float aq = a[r * k + q];
      const float* sh = shared + q * W + j0 + i;
      #pragma omp simd
      for (int64_t j = 0; j < m - i; ++j) rest[j] -= aq * sh[j];
    }
    #pragma omp simd
    for (int64_t j = 0; j < m - i; ++j) rest[j] *= inv_scale;
  }
};

template <typename T>
static Unmix<T> unmix_of(int64_t s, const torch::Tensor& z, const torch::Tensor& woodbury, const torch::Tensor& a,
                         const torch::Tensor& scale) {
  const int64_t R = z.size(1), W = z.size(2), k = a.size(-1);
  return Unmix<T>{R, W, k, z.data_ptr<T>() + s * R * W, woodbury.data_ptr<float>() + s * k * R,
                  a.data_ptr<float>() + s * R * k, scale.data_ptr<float>() + s * R};
}

static void check_unmix(const torch::Tensor& z, const torch::Tensor& woodbury, const torch::Tensor& a,
                        const torch::Tensor& scale) {
  for (const auto& t : {z, woodbury, a, scale})
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "ours' hops take contiguous CPU tensors");
  for (const auto& t : {woodbury, a, scale})
    TORCH_CHECK(t.scalar_type() == at::kFloat, "ours' hops: float32 masks");
  TORCH_CHECK(z.dim() == 3 && (z.scalar_type() == at::kHalf || z.scalar_type() == at::kFloat),
              "ours' hops take float16 or float32 answers [S, R, W]");
  const int64_t S = z.size(0), R = z.size(1), k = a.size(-1);
  TORCH_CHECK(woodbury.numel() == S * k * R && a.numel() == S * R * k && scale.numel() == S * R,
              "ours' hops: the recovery's shapes do not match");
}

// The plain split's three small TEE ops, each one call and one team where inductor's kernel is a compiled call and the
// eager ops three to eight (`tee_ops.RmsNorm.after`, `tee_ops.silu_gate`, `tee_ops.apply_rope`): rows cut among the
// team's threads, each row in float32 and rounded once.

// t = x + b rounded to T, and y = t in float32, m values (x and b in T or float32), each sum rounded once: the residual
// stream as the layer keeps it, and what its norm is taken of; returns Σ y²
template <typename X, typename B, typename T>
static inline float add_rounded(const X* x, const B* b, T* t, float* y, int64_t m) {
  int64_t j = 0;
  float sum = 0.0f;
#ifdef __AVX512F__
  __m512 squares = _mm512_setzero_ps();
  for (; j + 16 <= m; j += 16) {
    const __m512 total = store16(t + j, _mm512_add_ps(load16(x + j), load16(b + j)));
    _mm512_storeu_ps(y + j, total);
    squares = _mm512_fmadd_ps(total, total, squares);
  }
  sum = _mm512_reduce_add_ps(squares);
#endif
  float xs[COLUMNS], bs[COLUMNS];
  for (; j < m; j += COLUMNS) {
    const int64_t c = std::min(COLUMNS, m - j);
    const float *xv = as_float(x + j, xs, c), *bv = as_float(b + j, bs, c);
    #pragma omp simd
    for (int64_t i = 0; i < c; ++i) y[j + i] = xv[i] + bv[i];
    store(t + j, y + j, c);
    load(y + j, t + j, c);
    #pragma omp simd reduction(+:sum)
    for (int64_t i = 0; i < c; ++i) sum += y[j + i] * y[j + i];
  }
  return sum;
}

// (x + branch, where there is one, rounded to x's dtype) and its RMSNorm total·scaled/√(‖total‖² + eps_d) into
// `out`, rows of d values; returns the sum (a new tensor; x itself with no branch)
torch::Tensor rms_norm_rows(torch::Tensor x, c10::optional<torch::Tensor> branch, torch::Tensor scaled,
                            torch::Tensor eps_d, torch::Tensor out) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  const torch::Tensor total = branch ? at::empty_like(x) : x;
  std::vector<torch::Tensor> same = {x, out, total};
  if (branch) same.push_back(*branch);
  for (const auto& t : same)
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == x.scalar_type() && t.numel() == x.numel(),
                "rms_norm_rows: contiguous tensors of x's shape and dtype");
  TORCH_CHECK(scaled.is_contiguous() && scaled.scalar_type() == at::kFloat && scaled.numel() == d
              && eps_d.scalar_type() == at::kFloat && eps_d.numel() == 1, "rms_norm_rows: a float32 weight of d, eps");
  const float eps = eps_d.data_ptr<float>()[0];
  in_any_dtype(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *xs = x.data_ptr<T>(), *bs = branch ? branch->data_ptr<T>() : nullptr;
    T *os = out.data_ptr<T>(), *ts = total.data_ptr<T>();
    const float* w = scaled.data_ptr<float>();
    in_team([&](const Member& me) {
      std::vector<float> y(d), u(d);
      for (int64_t r = me.first(rows); r < me.last(rows); ++r) {
        const float* v = y.data();
        float sum = 0.0f;
        if (bs != nullptr) {
          sum = add_rounded(xs + r * d, bs + r * d, ts + r * d, y.data(), d);
        } else {
          v = as_float(xs + r * d, y.data(), d);
          #pragma omp simd reduction(+:sum)
          for (int64_t j = 0; j < d; ++j) sum += v[j] * v[j];
        }
        const float inv = 1.0f / std::sqrt(sum + eps);
        int64_t j0 = 0;
#ifdef __AVX512F__
        for (const __m512 by = _mm512_set1_ps(inv); j0 + 16 <= d; j0 += 16)
          store16(os + r * d + j0, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(v + j0), by), _mm512_loadu_ps(w + j0)));
#endif
        #pragma omp simd
        for (int64_t j = j0; j < d; ++j) u[j] = v[j] * inv * w[j];
        store(os + r * d + j0, u.data() + j0, d - j0);
      }
    });
  });
  return total;
}

// SiLU(gate)·up of gate_up [..., 2m] (gate, then up) into out [..., m], a chunk of a row at a time
void silu_gate_rows(torch::Tensor gate_up, torch::Tensor out) {
  const int64_t m = out.size(-1), rows = out.numel() / std::max<int64_t>(1, m);
  TORCH_CHECK(gate_up.is_contiguous() && out.is_contiguous() && gate_up.scalar_type() == out.scalar_type()
              && gate_up.numel() == 2 * out.numel(), "silu_gate_rows: contiguous, gate_up twice out's width, one dtype");
  in_any_dtype(out, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* gu = gate_up.data_ptr<T>();
    T* os = out.data_ptr<T>();
    in_team([&](const Member& me) {
      float g[COLUMNS], u[COLUMNS], y[COLUMNS];
      for (int64_t r = me.first(rows); r < me.last(rows); ++r) {
        int64_t j0 = 0;
#ifdef __AVX512F__
        for (const T* gate = gu + r * 2 * m; j0 + 16 <= m; j0 += 16)
          store16(os + r * m + j0, _mm512_mul_ps(silu16(load16(gate + j0)), load16(gate + m + j0)));
#endif
        for (; j0 < m; j0 += COLUMNS) {
          const int64_t c = std::min(COLUMNS, m - j0);
          const float* gs = as_float(gu + r * 2 * m + j0, g, c);
          const float* us = as_float(gu + r * 2 * m + m + j0, u, c);
          #pragma omp simd
          for (int64_t j = 0; j < c; ++j) y[j] = silu(gs[j]) * us[j];
          store(os + r * m + j0, y, c);
        }
      }
    });
  });
}

// otp's matmul recovered (`schemes._float32_cross`): the float32 cross terms plus the GPU's answer c, each sum
// rounded once into out (c's dtype and size): one pass where adding in place and rounding made three
void add_cross_terms(torch::Tensor cross, torch::Tensor c, torch::Tensor out) {
  TORCH_CHECK(cross.is_contiguous() && c.is_contiguous() && out.is_contiguous() && cross.scalar_type() == at::kFloat
              && out.scalar_type() == c.scalar_type() && cross.numel() == c.numel() && out.numel() == c.numel(),
              "add_cross_terms: contiguous float32 cross terms, c and out of one dtype and size");
  const int64_t total = c.numel(), chunks = (total + COLUMNS - 1) / COLUMNS;
  in_any_dtype(c, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const float* xs = cross.data_ptr<float>();
    const T* cs = c.data_ptr<T>();
    T* os = out.data_ptr<T>();
    in_team([&](const Member& me) {
      float scratch[COLUMNS], y[COLUMNS];
      for (int64_t chunk = me.first(chunks); chunk < me.last(chunks); ++chunk) {
        const int64_t j0 = chunk * COLUMNS, m = std::min(COLUMNS, total - j0);
        const float* cv = as_float(cs + j0, scratch, m);
        #pragma omp simd
        for (int64_t j = 0; j < m; ++j) y[j] = xs[j0 + j] + cv[j];
        store(os + j0, y, m);
      }
    });
  });
}

// one head's row x of h values rotated by its position's cos and sin: o = x·cos + rotate_half(x)·sin
static inline void rotate_row(const float* x, const float* cos, const float* sin, float* o, int64_t h) {
  const int64_t half = h / 2;
  #pragma omp simd
  for (int64_t j = 0; j < half; ++j) o[j] = x[j] * cos[j] - x[j + half] * sin[j];
  #pragma omp simd
  for (int64_t j = half; j < h; ++j) o[j] = x[j] * cos[j] + x[j - half] * sin[j];
}

#ifdef __AVX512F__
// rotate_row of a row (of T, or float32) into out, rounded to T, each half 16 values a register: the same operations.
// False where h is no multiple of 32 (64 and 128 in the LLaMA shapes are): none done.
template <typename X, typename T>
static inline bool rotated_in_registers(const X* x, const float* cos, const float* sin, T* out, int64_t h) {
  if (h % 32 != 0) return false;
  const int64_t half = h / 2;
  for (int64_t j = 0; j < half; j += 16) {
    const __m512 first = load16(x + j), second = load16(x + half + j);
    store16(out + j, _mm512_fmsub_ps(first, _mm512_loadu_ps(cos + j), _mm512_mul_ps(second, _mm512_loadu_ps(sin + j))));
    store16(out + half + j, _mm512_fmadd_ps(second, _mm512_loadu_ps(cos + half + j),
                                            _mm512_mul_ps(first, _mm512_loadu_ps(sin + half + j))));
  }
  return true;
}
#endif

// RoPE of x [B, heads, n, h] (any strides along its first three dimensions: a view of the heads of [B, n, heads·h])
// by cos and sin [n, h] into out (x's shape, contiguous): x·cos + rotate_half(x)·sin
void rope_rows(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor out) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && out.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "rope_rows: x [B, heads, n, h] with h contiguous, the rest contiguous");
  const int64_t heads = x.size(1), n = x.size(2), h = x.size(3), rows = x.numel() / h;
  for (const auto& t : {cos, sin, out})
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "rope_rows: one dtype");
  TORCH_CHECK(h % 2 == 0 && h <= COLUMNS && out.numel() == x.numel() && cos.numel() == n * h && sin.numel() == n * h,
              "rope_rows: shapes do not match");
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  in_any_dtype(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *xs = x.data_ptr<T>(), *cs = cos.data_ptr<T>(), *sn = sin.data_ptr<T>();
    T* os = out.data_ptr<T>();
    // the tables in float32, converted once a call, not once a head (float32 tables are read as they are)
    std::vector<float> tables(std::is_same<T, float>::value ? 0 : 2 * n * h);
    in_team([&](const Member& me) {
      for (int64_t i = me.first(n); tables.size() && i < me.last(n); ++i) {
        as_float(cs + i * h, tables.data() + i * h, h);
        as_float(sn + i * h, tables.data() + (n + i) * h, h);
      }
      me.sync();
      const float* cf = tables.size() ? tables.data() : reinterpret_cast<const float*>(cs);
      const float* sf = tables.size() ? tables.data() + n * h : reinterpret_cast<const float*>(sn);
      float a[COLUMNS], o[COLUMNS];
      for (int64_t r = me.first(rows); r < me.last(rows); ++r) {
        const int64_t i = r % n, head = r / n % heads, b = r / n / heads;
        const T* row = xs + b * s0 + head * s1 + i * s2;
#ifdef __AVX512F__
        if (rotated_in_registers(row, cf + i * h, sf + i * h, os + r * h, h)) continue;
#endif
        const float* v = as_float(row, a, h);
        rotate_row(v, cf + i * h, sf + i * h, o, h);
        store(os + r * h, o, h);
      }
    });
  });
}

// x rounded to bfloat16 and back, in place, a chunk at a time
static inline void rounded(float* x, int64_t m, const at::BFloat16*) {
  at::BFloat16 chunk[COLUMNS];
  for (int64_t j0 = 0; j0 < m; j0 += COLUMNS) {
    const int64_t c = std::min(COLUMNS, m - j0);
    store(chunk, x + j0, c);
    as_float(chunk, x + j0, c);
  }
}

// y = z + s·p, m values, in float32: otp's recovery of a linear's answer (`schemes.Otp.recover_linear`'s addcmul)
template <typename T>
static inline void recovered(const T* z, const T* p, float s, float* y, float* scratch, int64_t m) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 scale = _mm512_set1_ps(s);
  for (; j + 16 <= m; j += 16) _mm512_storeu_ps(y + j, _mm512_fmadd_ps(scale, load16(p + j), load16(z + j)));
#endif
  const float* zs = as_float(z + j, y + j, m - j);
  const float* ps = as_float(p + j, scratch, m - j);
  #pragma omp simd
  for (int64_t i = 0; i < m - j; ++i) y[j + i] = zs[i] + s * ps[i];
}

// out = h − σ·noise, m values, rounded to T: otp's pad of a linear's input (`schemes._pad_rows`), a row at a time
template <typename T>
static inline void padded(const float* h, const T* noise, float sigma, T* out, float* scratch, int64_t m) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 scale = _mm512_set1_ps(sigma);
  for (; j + 16 <= m; j += 16) store16(out + j, _mm512_fnmadd_ps(scale, load16(noise + j), _mm512_loadu_ps(h + j)));
#endif
  for (; j < m; j += COLUMNS) {
    const int64_t c = std::min(COLUMNS, m - j);
    const float* ns = as_float(noise + j, scratch, c);
    float o[COLUMNS];
    #pragma omp simd
    for (int64_t i = 0; i < c; ++i) o[i] = h[j + i] - sigma * ns[i];
    store(out + j, o, c);
  }
}

// otp's whole hop between two linears (`schemes.Otp.hop`: `schemes._add_op_pad`), a row at a time: the answer z
// [rows, W] recovered, z + σ·projected (σ a value a row, projected the pad's N·Wᵀ); then SiLU(gate)·up (`gated`: W/2
// wide) or the residual sum x + y, rounded to T into `kept`, and its RMSNorm (`weight`: float32, times √W; eps_d =
// W·eps); the result h padded for the next linear: σ' = pad_scale·rms(h) rounded to T, out = h − σ'·noise. Returns σ'
// [rows, 1] in T. Each row in float32 in the cache, rounded once where it is written (the steps round each of their
// four to eight results, each a pass over the rows): two passes over it, three with the norm (its sums, then h and
// its sums, then the pad).
torch::Tensor otp_linear_hop(torch::Tensor z, torch::Tensor sigma, torch::Tensor projected, bool gated,
                             torch::Tensor x, torch::Tensor weight, double eps_d, torch::Tensor noise,
                             double pad_scale, torch::Tensor out, torch::Tensor kept) {
  const int64_t W = z.size(-1), D2 = gated ? W / 2 : W, rows = z.numel() / std::max<int64_t>(1, W);
  TORCH_CHECK(!gated || W % 2 == 0, "otp_linear_hop: gate and up take half the answer each");
  std::vector<torch::Tensor> wide = {z, projected}, narrow = {noise, out};
  if (!gated) wide.insert(wide.end(), {x, kept});
  for (const auto& t : wide)
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == z.scalar_type() && t.numel() == rows * W,
                "otp_linear_hop: contiguous tensors of z's shape and dtype");
  for (const auto& t : narrow)
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == z.scalar_type() && t.numel() == rows * D2,
                "otp_linear_hop: the pad and the output in z's dtype, one row an answer's");
  TORCH_CHECK(sigma.is_contiguous() && sigma.scalar_type() == z.scalar_type() && sigma.numel() == rows,
              "otp_linear_hop: one scale a row, in z's dtype");
  TORCH_CHECK(gated || (weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.numel() == W),
              "otp_linear_hop: the norm's float32 weight");
  torch::Tensor next_sigma = at::empty({rows, 1}, z.options());
  const float eps = static_cast<float>(eps_d), scale = static_cast<float>(pad_scale),
              per_value = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D2)));
  in_any_dtype(z, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *zs = z.data_ptr<T>(), *ss = sigma.data_ptr<T>(), *ps = projected.data_ptr<T>(),
            *ns = noise.data_ptr<T>(), *xs = gated ? nullptr : x.data_ptr<T>();
    T *os = out.data_ptr<T>(), *ks = gated ? nullptr : kept.data_ptr<T>(), *next = next_sigma.data_ptr<T>();
    const float* w = gated ? nullptr : weight.data_ptr<float>();
    in_team([&](const Member& me) {
      // the row, and the weight, through pointers of this thread's own: read through the lambda's captures, the
      // simd loops below gathered every value (five times slower)
      std::vector<float> row(D2);
      float* const h = row.data();
      const float* const weights = w;
      float y[COLUMNS], u[COLUMNS], scratch[COLUMNS];
      for (int64_t r = me.first(rows); r < me.last(rows); ++r) {
        const T *zr = zs + r * W, *pr = ps + r * W;
        const float s = static_cast<float>(ss[r]);
        float squares = 0.0f;  // of h, or of the residual sum before its norm
        for (int64_t j0 = 0; j0 < D2; j0 += COLUMNS) {
          const int64_t c = std::min(COLUMNS, D2 - j0);
          float* hj = h + j0;
          recovered(zr + j0, pr + j0, s, y, scratch, c);
          if (gated) {
            recovered(zr + D2 + j0, pr + D2 + j0, s, u, scratch, c);
            #pragma omp simd reduction(+:squares)
            for (int64_t j = 0; j < c; ++j) {
              hj[j] = silu(y[j]) * u[j];
              squares += hj[j] * hj[j];
            }
          } else {  // the residual sum, kept in T, its norm taken of what is kept
            squares += add_rounded(y, xs + r * W + j0, ks + r * W + j0, hj, c);
          }
        }
        if (!gated) {
          const float inv = 1.0f / std::sqrt(squares + eps);
          squares = 0.0f;
          #pragma omp simd reduction(+:squares)
          for (int64_t j = 0; j < D2; ++j) {
            h[j] *= inv * weights[j];
            squares += h[j] * h[j];
          }
        }
        const T sigma_next = static_cast<T>(scale * std::max(std::sqrt(squares) * per_value, 1e-12f));
        next[r] = sigma_next;
        padded(h, ns + r * D2, static_cast<float>(sigma_next), os + r * D2, scratch, D2);
      }
    });
  });
  return next_sigma;
}

// pad = noise·σ and out = x − pad, m values, each rounded to T once: otp's protect of a matmul operand
// (`schemes._pad_tensor`), a row at a time
template <typename T>
static inline void pad_row(const float* x, const T* noise, float sigma, T* pad, T* out, float* scratch, int64_t m) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 scale = _mm512_set1_ps(sigma);
  for (; j + 16 <= m; j += 16)
    store16(out + j, _mm512_sub_ps(_mm512_loadu_ps(x + j), store16(pad + j, _mm512_mul_ps(load16(noise + j), scale))));
#endif
  const int64_t rest = m - j;
  const float* ns = as_float(noise + j, scratch, rest);
  float p[COLUMNS], o[COLUMNS];
  #pragma omp simd
  for (int64_t i = 0; i < rest; ++i) p[i] = ns[i] * sigma;
  rounded(p, rest, noise);
  #pragma omp simd
  for (int64_t i = 0; i < rest; ++i) o[i] = x[j + i] - p[i];
  store(pad + j, p, rest);
  store(out + j, o, rest);
}

// otp's hop from the qkv projection to the scores (`schemes.Otp.rope_hop`: `schemes._add_op_pad_both` with
// `tee_ops.rotated_heads`), for the answer z [B, N, (H + 2G)·h]: each row recovered, z + σ·projected, in float32; q's
// and k's heads rotated by cos and sin [N, h] into `rotated` [B, H + G, N, h], v's heads into `v` [B, N, G·h], each
// rounded once; then q (rotated's first H heads) and kᵀ padded, each at pad_scale times its whole tensor's RMS, σ
// rounded to T: the pads noise·σ, rounded, into pad_a [B, H, N, h] and pad_b [B, G, h, N], the operands less them into
// out_a and out_b (their shapes). Two passes, apart by the team's sums: each row recovered and rotated; each
// operand's rows padded (kᵀ's read down k's columns).
void otp_rope_hop(torch::Tensor z, torch::Tensor sigma, torch::Tensor projected, torch::Tensor cos, torch::Tensor sin,
                  torch::Tensor rotated, torch::Tensor v, torch::Tensor noise_a, torch::Tensor noise_b, double pad_scale,
                  torch::Tensor out_a, torch::Tensor out_b, torch::Tensor pad_a, torch::Tensor pad_b) {
  TORCH_CHECK(z.dim() == 3 && rotated.dim() == 4, "otp_rope_hop: z [B, N, W], rotated [B, H + G, N, h]");
  const int64_t B = z.size(0), N = z.size(1), W = z.size(2), h = rotated.size(3), both = rotated.size(1),
                H = noise_a.size(1), G = both - H;
  TORCH_CHECK(h % 2 == 0 && h <= COLUMNS && G > 0 && (both + G) * h == W && rotated.size(0) == B && rotated.size(2) == N,
              "otp_rope_hop: rotated's heads and z's width do not match");
  const std::vector<std::pair<torch::Tensor, int64_t>> sized = {
      {z, B * N * W}, {projected, B * N * W}, {sigma, B * N}, {cos, N * h}, {sin, N * h}, {rotated, B * both * N * h},
      {v, B * N * G * h}, {noise_a, B * H * N * h}, {out_a, B * H * N * h}, {pad_a, B * H * N * h},
      {noise_b, B * G * h * N}, {out_b, B * G * h * N}, {pad_b, B * G * h * N}};
  for (const auto& [t, numel] : sized)
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == z.scalar_type() && t.numel() == numel,
                "otp_rope_hop: contiguous tensors in z's dtype, of the shapes the hop's steps give");
  std::vector<double> sums(2 * std::max(1, omp_get_max_threads()), 0.0);  // each thread's q and k square sums
  in_any_dtype(z, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *zs = z.data_ptr<T>(), *ss = sigma.data_ptr<T>(), *ps = projected.data_ptr<T>(), *cs = cos.data_ptr<T>(),
            *sn = sin.data_ptr<T>(), *na = noise_a.data_ptr<T>(), *nb = noise_b.data_ptr<T>();
    T *rot = rotated.data_ptr<T>(), *vs = v.data_ptr<T>(), *oa = out_a.data_ptr<T>(), *ob = out_b.data_ptr<T>(),
      *pa = pad_a.data_ptr<T>(), *pb = pad_b.data_ptr<T>();
    in_team([&](const Member& me) {
      float y[COLUMNS], scratch[COLUMNS], c[COLUMNS], sine[COLUMNS], o[COLUMNS];
      double q_squares = 0.0, k_squares = 0.0;
      for (int64_t r = me.first(B * N); r < me.last(B * N); ++r) {
        const int64_t b = r / N, i = r % N;
        const float s = static_cast<float>(ss[r]);
        load(c, cs + i * h, h);
        load(sine, sn + i * h, h);
        for (int64_t head = 0; head < both + G; ++head) {
          recovered(zs + r * W + head * h, ps + r * W + head * h, s, y, scratch, h);
          if (head >= both) {  // v, as recovered
            store(vs + r * G * h + (head - both) * h, y, h);
            continue;
          }
          rotate_row(y, c, sine, o, h);
          float sum = 0.0f;
          #pragma omp simd reduction(+:sum)
          for (int64_t j = 0; j < h; ++j) sum += o[j] * o[j];
          (head < H ? q_squares : k_squares) += sum;
          store(rot + ((b * both + head) * N + i) * h, o, h);
        }
      }
      sums[2 * me.thread] = q_squares;
      sums[2 * me.thread + 1] = k_squares;
      me.sync();
      double q_total = 0.0, k_total = 0.0;
      for (int64_t t = 0; t < me.threads; ++t) {
        q_total += sums[2 * t];
        k_total += sums[2 * t + 1];
      }
      // each operand's σ as `_pad_tensor` takes it: pad_scale times its RMS in float32, rounded to T
      const auto scale_of = [&](double total, int64_t count) {
        const float rms = static_cast<float>(std::sqrt(total)) * static_cast<float>(1.0 / std::sqrt(double(count)));
        return static_cast<float>(static_cast<T>(static_cast<float>(pad_scale) * rms));
      };
      const float sigma_a = scale_of(q_total, B * H * N * h), sigma_b = scale_of(k_total, B * G * N * h);
      for (int64_t r = me.first(B * H * N); r < me.last(B * H * N); ++r) {  // q's rows, as rotated holds them
        const int64_t b = r / (H * N), rest = r % (H * N);
        const float* x = as_float(rot + (b * both * N) * h + rest * h, y, h);
        pad_row(x, na + r * h, sigma_a, pa + r * h, oa + r * h, scratch, h);
      }
      T column[COLUMNS];
      for (int64_t r = me.first(B * G * h); r < me.last(B * G * h); ++r) {  // kᵀ's rows: k's columns
        const int64_t b = r / (G * h), g = r / h % G, j = r % h;
        const T* k = rot + ((b * both + H + g) * N) * h + j;
        for (int64_t i0 = 0; i0 < N; i0 += COLUMNS) {
          const int64_t m = std::min(COLUMNS, N - i0);
          for (int64_t i = 0; i < m; ++i) column[i] = k[(i0 + i) * h];
          const float* x = as_float(column, y, m);
          pad_row(x, nb + r * N + i0, sigma_b, pb + r * N + i0, ob + r * N + i0, scratch, m);
        }
      }
    });
  });
}

// one sequence of ours' hop between two linears (`ours_linear_hop`): z unmixed, then SiLU·up or the residual sum
template <typename T>
struct LinearHop {
  Unmix<T> unmix;
  bool gated;
  const T* x;
  const float* weight;
  float eps_d;
  Mix<T> mix;

  // rows r0 to r1 recovered (given the Woodbury sums `shared`), the op, kept in T; then the mix's group step
  void op_rows(int64_t r0, int64_t r1, const float* shared, float* acc, float* c) const {
    const int64_t D2 = mix.D2;
    float y[COLUMNS], up[COLUMNS];
    for (int64_t r = r0; r < r1; r += ROWS) {
      const int64_t g = std::min(ROWS, r1 - r);
      float squares[ROWS] = {0.0f, 0.0f, 0.0f, 0.0f}, inv_rms[ROWS] = {1.0f, 1.0f, 1.0f, 1.0f};
      for (int64_t i = 0; i < g; ++i) {  // a row at a time: fewer streams from memory at once
        float sum1 = 0.0f, sum2 = 0.0f;
        for (int64_t j0 = 0; j0 < D2; j0 += COLUMNS) {
          const int64_t m = std::min(COLUMNS, D2 - j0);
          unmix.row(r + i, j0, m, shared, y);
          if (gated) {  // SiLU(gate)·up, in T
            unmix.row(r + i, D2 + j0, m, shared, up);
            #pragma omp simd
            for (int64_t j = 0; j < m; ++j) y[j] = silu(y[j]) * up[j];
            rounded(y, m, unmix.z);
            #pragma omp simd reduction(+:sum2)
            for (int64_t j = 0; j < m; ++j) sum2 += y[j] * y[j];
          } else {  // the residual sum, in T; its RMSNorm's sums
            const float* xr = load(up, x + (r + i) * D2 + j0, m);
            const float* w = weight + j0;
            #pragma omp simd
            for (int64_t j = 0; j < m; ++j) y[j] += xr[j];
            rounded(y, m, unmix.z);
            #pragma omp simd reduction(+:sum1, sum2)
            for (int64_t j = 0; j < m; ++j) {
              sum1 += y[j] * y[j];
              sum2 += y[j] * w[j] * y[j] * w[j];
            }
          }
          store(mix.kept + (r + i) * D2 + j0, y, m);
        }
        squares[i] = sum2;
        if (!gated) inv_rms[i] = 1.0f / std::sqrt(eps_d + sum1);
      }
      mix.group(r, g, squares, inv_rms, c, acc);
    }
  }
};

// ours' whole hop between two linears (`schemes.Matrix.hop`), unmix -> SiLU·up (`gated`) or residual + RMSNorm ->
// mix, for the answer z [S, R, W]: the next linear's input into `out` [S, R, D2], what the op keeps (SiLU·up, or the
// residual sum) into `kept` (out's shape); returns the next mask's row scale D·diag(1/rms) [S, R, 1]. Three passes
// over rows cut into one run a thread: the Woodbury column sums of z; each row recovered, its op, its scale for the
// mix and its share of the mix's column sums; each row mixed.
torch::Tensor ours_linear_hop(torch::Tensor z, torch::Tensor woodbury, torch::Tensor a, torch::Tensor scale,
                              bool gated, torch::Tensor x, torch::Tensor weight, double eps_d, torch::Tensor d,
                              torch::Tensor a_next, torch::Tensor bt, torch::Tensor out, torch::Tensor kept) {
  check_unmix(z, woodbury, a, scale);
  const int64_t S = z.size(0), R = z.size(1), W = z.size(2), k = a.size(-1), D2 = gated ? W / 2 : W;
  TORCH_CHECK(!gated || W % 2 == 0, "ours_linear_hop: gate and up take half the answer each");
  check_mix(d, a_next, bt, out, kept, z, S, R, D2);
  if (!gated)
    TORCH_CHECK(x.is_contiguous() && x.scalar_type() == z.scalar_type() && x.numel() == S * R * W
                && weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.numel() == W,
                "ours_linear_hop: the residual in z's dtype and layout, the norm's float32 weight");
  torch::Tensor next_scale = at::empty({S, R, 1}, d.options());
  const Runs runs(R);
  std::vector<float> unmix_sums(runs.parts * k * W), mix_sums(runs.parts * k * D2), c(R);
  in_dtype(z, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const float* w = gated ? nullptr : weight.data_ptr<float>();
    in_team([&](const Member& me) {
      for (int64_t s = 0; s < S; ++s) {
        const LinearHop<T> hop{unmix_of<T>(s, z, woodbury, a, scale), gated,
                               gated ? nullptr : x.data_ptr<T>() + s * R * W, w, static_cast<float>(eps_d),
                               mix_of<T>(s, R, D2, d, a_next, bt, w, kept, out, next_scale)};
        const float* shared = hop.unmix.shared(me, runs, unmix_sums.data());
        hop.mix.run(me, runs, mix_sums.data(), c.data(), [&](int64_t r0, int64_t r1, float* acc, float* cs) {
          hop.op_rows(r0, r1, shared, acc, cs);
        });
        me.sync();  // the sums' rows are the next sequence's
      }
    });
  });
  return next_scale;
}

// the first half of ours' RoPE hop (`schemes.Matrix.rope_hop`): the qkv projection's answer z [S, R, W] unmixed
// (`_unmix_rows`), q's and k's heads rotated (`tee_ops.rotated_heads`: cos and sin [R, h], in z's dtype) into
// `rotated` [S, H + G, R, h], v's heads into `v` [S, R, G·h], each head recovered, rotated and rounded once. Two
// passes over rows cut into one run a thread: the Woodbury column sums; each row's heads.
void ours_unmix_rope(torch::Tensor z, torch::Tensor woodbury, torch::Tensor a, torch::Tensor scale,
                     torch::Tensor cos, torch::Tensor sin, torch::Tensor rotated, torch::Tensor v,
                     std::vector<torch::Tensor> permute, std::vector<bool> divides) {
  check_unmix(z, woodbury, a, scale);
  const Permutes permutes(permute, divides);
  const int64_t S = z.size(0), R = z.size(1), W = z.size(2), k = a.size(-1), rotated_heads = rotated.size(1),
                h = rotated.size(3), G = v.size(2) / h;
  for (const auto& t : {cos, sin, rotated, v})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == z.scalar_type(), "ours_unmix_rope: contiguous, in z's dtype");
  TORCH_CHECK(h % 2 == 0 && h <= COLUMNS && (rotated_heads + G) * h == W && rotated.numel() == S * rotated_heads * R * h
              && v.numel() == S * R * G * h && cos.numel() == R * h && sin.numel() == R * h,
              "ours_unmix_rope: shapes do not match");
  const Runs runs(R);
  std::vector<float> sums(runs.parts * k * W);
  in_dtype(z, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *cs = cos.data_ptr<T>(), *sn = sin.data_ptr<T>();
    in_team([&](const Member& me) {
      for (int64_t s = 0; s < S; ++s) {
        const Unmix<T> unmix = unmix_of<T>(s, z, woodbury, a, scale);
        const float* shared = unmix.shared(me, runs, sums.data());
        T* rot = rotated.data_ptr<T>() + s * rotated_heads * R * h;
        T* vs = v.data_ptr<T>() + s * R * G * h;
        runs.each(me, [&](int64_t, int64_t r0, int64_t r1) {
          float y[COLUMNS], c[COLUMNS], sine[COLUMNS], o[COLUMNS];
          const int64_t heads_a_chunk = COLUMNS / h;
          for (int64_t r = r0; r < r1; ++r) {
            load(c, cs + r * h, h);
            load(sine, sn + r * h, h);
            for (int64_t first = 0; first < rotated_heads + G; first += heads_a_chunk) {  // whole heads a chunk
              const int64_t heads = std::min(heads_a_chunk, rotated_heads + G - first);
              unmix.row(r, first * h, heads * h, shared, y);
              for (int64_t head = first; head < first + heads; ++head) {
                const float* x = y + (head - first) * h;
                if (head >= rotated_heads) {  // v's heads, as they are
                  store(vs + r * G * h + (head - rotated_heads) * h, x, h);
                  continue;
                }
#ifdef __AVX512F__
                if (rotated_in_registers(x, c, sine, rot + (head * R + r) * h, h)) continue;
#endif
                rotate_row(x, c, sine, o, h);
                store(rot + (head * R + r) * h, o, h);
              }
            }
          }
        });
        me.sync();  // the sums' rows are the next sequence's; every head rotated, for the permutations
      }
      permutes.run(me);
    });
  });
}

// ours' hop from P·V to the o projection (`schemes.Matrix.attend_hop`) for the answer c [B, H, n, h]: each head's
// rows unscaled (d1 [B, G, H/G, n], d3 [B, G, h]) and unpermuted (`rows`: each output row's flat source row,
// `cols` [B, G, h] int32: each output column's source), the heads merged, and mixed for o (`Mix`): the next
// linear's input into `out` [B, n, H·h], the merged heads into `kept`; returns the mix's row scale [B, n, 1]. Two
// passes over output rows cut into one run a thread: each row gathered from its heads with its scale and share of
// the mix's sums; each row mixed.
torch::Tensor ours_attend_hop(torch::Tensor c, torch::Tensor rows, torch::Tensor cols, torch::Tensor d1,
                              torch::Tensor d3, torch::Tensor d, torch::Tensor a_next, torch::Tensor bt,
                              torch::Tensor out, torch::Tensor kept) {
  const int64_t B = c.size(0), H = c.size(1), n = c.size(2), h = c.size(3), G = cols.size(1), k = a_next.size(-1);
  check_mix(d, a_next, bt, out, kept, c, B, n, H * h);
  for (const auto& t : {c, rows, cols, d1, d3})
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "ours_attend_hop takes contiguous CPU tensors");
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kInt && d1.scalar_type() == c.scalar_type()
              && d3.scalar_type() == c.scalar_type(),
              "ours_attend_hop: int64 rows, int32 columns, scales in c's dtype");
  TORCH_CHECK(H % G == 0 && h <= COLUMNS && rows.numel() == B * H * n && cols.numel() == B * G * h
              && d1.numel() == B * H * n && d3.numel() == B * G * h, "ours_attend_hop: shapes do not match");
  torch::Tensor next_scale = at::empty({B, n, 1}, d.options());
  const Runs runs(n);
  const int64_t D2 = H * h;
  std::vector<float> sums(runs.parts * k * D2), cs(n), inv_d3(B * G * h);
  const int32_t* col = cols.data_ptr<int32_t>();
  in_dtype(c, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* d3s = d3.data_ptr<T>();
    for (int64_t i = 0; i < B * G * h; ++i)  // each output column's column scale, at its source
      inv_d3[i] = 1.0f / static_cast<float>(d3s[(i / h) * h + col[i]]);
    const T* cc = c.data_ptr<T>();
    const T* d1s = d1.data_ptr<T>();
    const int64_t* src_rows = rows.data_ptr<int64_t>();
    in_team([&](const Member& me) {
      for (int64_t b = 0; b < B; ++b) {
        const Mix<T> mix = mix_of<T>(b, n, D2, d, a_next, bt, nullptr, kept, out, next_scale);
        mix.run(me, runs, sums.data(), cs.data(), [&](int64_t r0, int64_t r1, float* acc, float* scales) {
          // head by head, so that a head's source rows (its n rows, in a random order) stay in the cache
          std::vector<float> squares(r1 - r0, 0.0f);
          float source[COLUMNS], y[COLUMNS];
          for (int64_t head = 0; head < H; ++head) {
            const int64_t group = b * G + head / (H / G);
            const int32_t* from = col + group * h;
            const float* inv = inv_d3.data() + group * h;
            const int64_t* head_rows = src_rows + (b * H + head) * n;
            for (int64_t r = r0; r < r1; ++r) {
              if (r + 4 < r1) prefetch_row(cc + head_rows[r + 4] * h, h);
              const int64_t src = head_rows[r];
              const float* v = as_float(cc + src * h, source, h);
              const float inv_d1 = 1.0f / static_cast<float>(d1s[src]);
#ifdef __AVX512F__
              if (!permuted_in_registers(v, from, inv_d1, inv, y, h))
#endif
              {
                #pragma omp simd
                for (int64_t j = 0; j < h; ++j) y[j] = v[from[j]] * inv_d1 * inv[j];
              }
              rounded(y, h, cc);  // the merged heads in T, as the o projection's input is
              float sum = 0.0f;
              #pragma omp simd reduction(+:sum)
              for (int64_t j = 0; j < h; ++j) sum += y[j] * y[j];
              squares[r - r0] += sum;
              store(mix.kept + r * D2 + head * h, y, h);
            }
          }
          const float inv_rms[ROWS] = {1.0f, 1.0f, 1.0f, 1.0f};
          for (int64_t r = r0; r < r1; r += ROWS)
            mix.group(r, std::min(ROWS, r1 - r), squares.data() + (r - r0), inv_rms, scales, acc);
        });
        me.sync();  // the sums' rows are the next sequence's
      }
    });
  });
  return next_scale;
}
"""


@functools.cache
def _built():
    """The extension module, built on first use (33 s on the 2-core VM; then loaded from the cache, 0.2 s), or None
    where it cannot be (`kernels.failed` says why)."""
    print("loading the TEE's C++ kernels (built once per machine: about half a minute the first time)",
          file=sys.stderr, flush=True)
    try:
        from torch.utils.cpp_extension import load_inline
        # a build per torch version, each against its own headers (a machine may hold two, as the VM does); OpenMP
        # for at::parallel_for (torch's own runtime, already loaded), which without it runs on one thread
        return load_inline(f"splitinfer_native_{re.sub(r'[^0-9a-zA-Z]', '_', torch.__version__)}", cpp_sources=SOURCE,
                           functions=["ours_softmax_hop", "softmax_blocks", "permute_scales", "ours_linear_hop",
                                      "ours_attend_hop", "ours_unmix_rope", "empty_team", "rms_norm_rows",
                                      "silu_gate_rows", "rope_rows", "otp_linear_hop", "otp_rope_hop", "add_cross_terms"],
                           extra_ldflags=["-fopenmp"], verbose=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"])
    except Exception as e:  # no compiler, no ninja, a failed build: the steps run instead
        kernels.failed[NAME] = kernels.first_line(e)
        return None


def _module():
    """The built extension; a RuntimeError where it cannot be built (set-up's choice of form then leaves its kernels
    out, with a warning)."""
    module = _built()
    if module is None:
        raise RuntimeError(f"{NAME} could not be built: {kernels.failed[NAME]}")
    return module


_left_out = [False]  # within `left_out`


@contextlib.contextmanager
def left_out():
    """Within: the kernels are a form of no step, so every step runs the form set-up picked among the others (an
    engine timed without them: `SplitLlama(native_kernels=False)`). Set-up's picks stay as they are."""
    _left_out[0] = True
    try:
        yield
    finally:
        _left_out[0] = False


def offered(t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = DTYPES) -> bool:
    """Whether the kernels are a form of a step on tensors like `t`: beside compiled kernels or eager ones
    (`kernels.cpp_offered`), in one of the step's `dtypes`, unless they failed to build or are `left_out`. They are
    built at their first call, in set-up's choice of form (`kernels.pick`)."""
    return kernels.cpp_offered() and t.dtype in dtypes and NAME not in kernels.failed and not _left_out[0]


def in_picked_form(step: str, key: torch.Tensor, forms: dict[str, Callable[[], object]],
                   one_pass: Callable[[], object], usable: bool = True, dtypes: tuple[torch.dtype, ...] = DTYPES):
    """What one of `step`'s forms (calls of no arguments) returns, or `one_pass` (with these kernels) where they are
    offered for tensors like `key` (in one of `dtypes`, and `usable`), on torch's threads or on one
    (`kernels.on_one_thread`): the one set-up picked at key's shape (`kernels.pick`), the first of `forms` elsewhere.

    One thread, not a few: `at::parallel_for` starts every thread of torch's OpenMP pool whatever the work, and runs
    inline on one. A count between would make the pool end its other threads, which the next call on all of them
    starts anew (on the VM, a call on 2 of 8 threads ended 6, and 8 then started 6 new ones).

    Outside set-up the pick is only looked up: the plain split makes 81 such calls an inference, and building the
    forms for `kernels.pick` took 4 µs of each on the VM."""
    offer = usable and offered(key, dtypes)
    if not kernels.choosing_now():
        form = kernels.picked(step, key, "") if offer else ""
        if form == ONE_PASS:
            return one_pass()
        if form == ONE_PASS_ONE_THREAD:
            return kernels.on_one_thread(one_pass, ())
        return (forms[form] if form in forms else next(iter(forms.values())))()
    if offer:
        forms = {**forms, ONE_PASS: one_pass}
        if torch.get_num_threads() > 1:
            forms[ONE_PASS_ONE_THREAD] = functools.partial(kernels.on_one_thread, one_pass, ())
    return forms[kernels.pick(step, key, forms)]()


def ours_softmax_hop(c5: torch.Tensor, d1: torch.Tensor, d3: torch.Tensor, rows_at: torch.Tensor, keys: torch.Tensor,
                     a_rows: torch.Tensor, cols: torch.Tensor, next_d1: torch.Tensor, next_d2: torch.Tensor,
                     out: torch.Tensor, *permutes: tuple) -> torch.Tensor:
    """The probabilities of ours' scores c5 [B, G, R, n, m], kept in their masks' order (unscaled by d1 [B, G, R, n]
    and d3 [B, G, m], keys at positions `keys` [B, G, m] past a row's position `rows_at` [B, G, R, n] hidden),
    protected for P·V: rows gathered by `a_rows` (flat over all rows), columns by `cols` [B, G, m] (int32), scaled by
    next_d1 down the rows and next_d2 along them; into `out` (c5's shape, contiguous), which it returns. In the
    same call, each of `permutes` (`permute_scales`' jobs: P·V's other operand)."""
    from splitinfer.tee_ops import BLOCKED  # here: tee_ops imports this module
    return _module().ours_softmax_hop(c5, d1.contiguous(), d3.contiguous(), rows_at.contiguous(), keys.contiguous(),
                                      a_rows, cols.contiguous(), next_d1.contiguous(),
                                      next_d2.contiguous(), out, BLOCKED, *_permute_lists(permutes))


def softmax_blocks(scores: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, batch: int, heads: int,
                   starts: tuple[int, ...], padded: bool = True) -> torch.Tensor:
    """`tee_ops.CausalBlocks.softmax` of packed scores into `out` (both contiguous): each row's softmax with its row
    of the [B, 1, n, n] bias, in one pass, every block in one call; not `padded`, later keys hidden by their index,
    the bias's values unused."""
    from splitinfer.tee_ops import BLOCKED  # here: tee_ops imports this module
    return _module().softmax_blocks(scores, bias.contiguous(), out, batch, heads, list(starts), padded, BLOCKED)


def permute_scales(*jobs: tuple) -> None:
    """ours' masks on matmul operands, in one call: every job's rows cut among one team of threads. A job is (x, rows,
    cols, row_scale, col_scale, out, row_divides): out[r, j] = x[rows[r], cols[g, j]] · row_scale[r] · col_scale[g, j]
    (÷ row_scale[r] where `row_divides`), into `out` (contiguous): x [..., m] (any strides) as rows of m, `rows` the
    flat source row of each of out's rows, `cols` [..., G, m] each group's column order (int32), g = r's group (out's
    rows cut into G equal runs), row_scale one value a row of out, col_scale [..., G, m]; all in x's dtype."""
    _module().permute_scales(*_permute_lists(jobs))


def _permute_lists(jobs: tuple[tuple, ...]) -> tuple[list[torch.Tensor], list[bool]]:
    """`permute_scales` jobs as the C++ kernels take them: six tensors a job, and whether each one's row scale
    divides."""
    tensors = [t for x, rows, cols, row_scale, col_scale, out, _ in jobs
               for t in (x, rows, cols, row_scale.contiguous(), col_scale.contiguous(), out)]
    return tensors, [bool(job[-1]) for job in jobs]


def ours_linear_hop(z3: torch.Tensor, woodbury_rows: torch.Tensor, a: torch.Tensor, scale: torch.Tensor,
                    norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, d: torch.Tensor,
                    a_next: torch.Tensor, b_t_over_d: torch.Tensor, out: torch.Tensor, kept: torch.Tensor
                    ) -> torch.Tensor:
    """ours' hop between two linears in one call (`schemes._unmix_op_mix`'s values, in float32 throughout): the
    answer z3 [S, R, W] unmixed (`_unmix_rows`: woodbury_rows [S, k, R], a [S, R, k], scale [S, R, 1]); then
    SiLU(gate)·up where `norm` is None, else the residual sum x + y and its RMSNorm, norm = (x [S, R, W] in z3's
    dtype, the float32 weight times √W, W·eps as a tensor); the result mixed at unit RMS rows (`_mix_rows`: d
    [S, R], a_next [S, R, k], b_t_over_d [S, k, R]) into `out` [S, R, W or W/2], what the op keeps (the residual
    sum, or SiLU·up) into `kept` (out's shape, z3's dtype). Returns the mix's row scale D·diag(1/rms) [S, R, 1]."""
    x, weight, eps_d = norm if norm is not None else (z3, scale, torch.zeros(()))
    return _module().ours_linear_hop(z3.contiguous(), woodbury_rows.contiguous(), a.contiguous(), scale.contiguous(),
                                     norm is None, x.contiguous(), weight.contiguous(), float(eps_d), d.contiguous(),
                                     a_next.contiguous(), b_t_over_d.contiguous(), out, kept)


def ours_attend_hop(c: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d1: torch.Tensor, d3: torch.Tensor,
                    d: torch.Tensor, a_next: torch.Tensor, b_t_over_d: torch.Tensor, out: torch.Tensor,
                    kept: torch.Tensor) -> torch.Tensor:
    """ours' hop from P·V to the o projection in one call (`schemes._unpermute_op_mix` with the heads merged, in
    float32 throughout): the answer c [B, H, n, h] unscaled (d1 [B, G, H/G, n], d3 [B, G, h], in c's dtype) and
    unpermuted (`rows`: each output row's flat source row, int64; `cols` [B, G, h]: each output column's source,
    int32), its heads merged into `kept` [B, n, H·h], and mixed for o (`_mix_rows`: d [B, n], a_next [B, n, k],
    b_t_over_d [B, k, n]) into `out` (kept's shape). Returns the mix's row scale [B, n, 1]."""
    return _module().ours_attend_hop(c.contiguous(), rows.contiguous(), cols.contiguous(), d1.contiguous(),
                                     d3.contiguous(), d.contiguous(), a_next.contiguous(), b_t_over_d.contiguous(),
                                     out, kept)


def ours_unmix_rope(z3: torch.Tensor, woodbury_rows: torch.Tensor, a: torch.Tensor, scale: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, rotated: torch.Tensor, v: torch.Tensor,
                    *permutes: tuple) -> None:
    """The first half of ours' RoPE hop in one call (`schemes._unmix_rows`, then `tee_ops.rotated_heads`, in float32
    throughout): the qkv projection's answer z3 [S, R, W] unmixed, q's and k's heads rotated by cos and sin [R, h]
    into `rotated` [S, H + G, R, h], v's heads into `v` [S, R, G·h] (both contiguous, in z3's dtype). Then, in the
    same call, each of `permutes` (`permute_scales`' jobs: the scores' operands, views of `rotated`)."""
    _module().ours_unmix_rope(z3.contiguous(), woodbury_rows.contiguous(), a.contiguous(), scale.contiguous(),
                              cos.contiguous(), sin.contiguous(), rotated, v, *_permute_lists(permutes))


def empty_team(barriers: int = 0) -> None:
    """One team of torch's threads that only waits at `barriers` barriers: what starting a team costs (`in_team`)."""
    _module().empty_team(barriers)


def rms_norm(x: torch.Tensor, branch: torch.Tensor | None, scaled: torch.Tensor, eps_d: torch.Tensor, out: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`tee_ops.RmsNorm.after` in one call: (x + branch, its RMSNorm into `out`), or (x, its RMSNorm) with no branch;
    x, branch and out contiguous, in one dtype. The sum is made in C++: a call fewer from Python."""
    return _module().rms_norm_rows(x, branch, scaled, eps_d, out), out


def silu_gate(gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`tee_ops.silu_gate` in one call, into `out` (both contiguous, in one dtype)."""
    _module().silu_gate_rows(gate_up, out)
    return out


def add_cross_terms(cross: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """otp's float32 cross terms plus the GPU's answer c, each sum rounded once into `out` (c's dtype and size; all
    contiguous): `cross.add_(c).to(c.dtype)` in one pass."""
    _module().add_cross_terms(cross, c, out)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`tee_ops.apply_rope` in one call, into `out` (contiguous; x [B, heads, n, h] a view with h contiguous)."""
    _module().rope_rows(x, cos, sin, out)
    return out


def otp_linear_hop(z: torch.Tensor, sigma: torch.Tensor, projected: torch.Tensor,
                   norm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, noise: torch.Tensor, pad_scale: float,
                   out: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """otp's hop between two linears in one call (`schemes._add_op_pad`'s values, each row in float32, rounded once
    where it is written: the residual sum, the padded input, the scales): the answer z [..., W] recovered with its row
    scales sigma [..., 1] and the pad's product `projected` (z's shape); then SiLU(gate)·up where `norm` is None,
    else the residual sum x + y into `kept` and its RMSNorm, norm = (x in z's shape, the float32 weight times √W,
    W·eps as a tensor); the result padded with `noise` [..., W or W/2] at pad_scale times each row's RMS into `out`
    (noise's shape). All contiguous, in one dtype. Returns the new row scales [..., 1]."""
    x, weight, eps_d = norm if norm is not None else (z, sigma, torch.zeros(()))
    return _module().otp_linear_hop(z, sigma, projected, norm is None, x, weight, float(eps_d), noise,
                                    float(pad_scale), out, z if kept is None else kept).view(*noise.shape[:-1], 1)


def otp_rope_hop(z: torch.Tensor, sigma: torch.Tensor, projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 heads: int, rotated: torch.Tensor, noise_a: torch.Tensor, noise_b: torch.Tensor, pad_scale: float,
                 out_a: torch.Tensor, out_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """otp's hop from the qkv projection to the scores in one call (`schemes._add_op_pad_both` with
    `tee_ops.rotated_heads`, each value in float32, rounded once where it is written): the answer z [B, N, W] recovered
    with its row scales sigma and the pad's product `projected`; q's and k's heads rotated by cos and sin into
    `rotated` [B, H + G, N, h]; q and kᵀ padded with noise_a [B, H, N, h] and noise_b [B, G, h, N], each at pad_scale
    times its tensor's RMS, into out_a and out_b. All contiguous, in one dtype. Returns what the steps return: (v
    [B, G, N, h], q and kᵀ padded, q, q's pad, kᵀ's pad)."""
    batch, n, _ = z.shape
    head_dim = rotated.shape[-1]
    v = torch.empty(batch, n, (rotated.shape[1] - heads) * head_dim, dtype=z.dtype)
    pad_a, pad_b = torch.empty_like(noise_a), torch.empty_like(noise_b)
    _module().otp_rope_hop(z, sigma, projected, cos, sin, rotated, v, noise_a, noise_b, float(pad_scale), out_a, out_b,
                           pad_a, pad_b)
    return v.view(batch, n, -1, head_dim).transpose(1, 2), out_a, out_b, rotated[:, :heads], pad_a, pad_b
