// Building blocks of the tiled (FlashAttention-style) CPU attention kernels: an fp32
// row-major GEMM on tiles, the row operations of an online softmax with a per-key bias,
// and a work queue for at::parallel_for. Shared by soft_mask_attention_cpu.cpp and
// attention_column_scores_cpu.cpp.
//
// Row operations take `bias` per key: 0 (or log w) for a key the row may see, -inf for one
// it may not; `limit` cuts a row at the causal diagonal (keys >= limit are not seen).
// exp of -inf (or of anything below fp32's range) is exactly 0, so a key that is not seen
// contributes exactly nothing, also to gradients.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GLIMPSE_TILES_AVX2 1
#endif

// MKL's (or any BLAS's) Fortran sgemm, as libtorch_cpu exports it on x86 builds. Weak: when
// the running torch has none, the tiles go through at::mm instead.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

namespace glimpse {
namespace tiles {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// GLIMPSE_CPU_GEMM=aten forces the at::mm path (tests cover both).
inline bool use_blas() {
  static const bool blas = [] {
    const char* forced = std::getenv("GLIMPSE_CPU_GEMM");
    return sgemm_ != nullptr && !(forced && std::string(forced) == "aten");
  }();
  return blas;
}

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C, op(X) = X^T when trans_x. A is [m, k]
// (or [k, m] transposed) with row stride lda; B is [k, n] (or [n, k]) with row stride ldb.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (use_blas()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor ta = at::from_blob(const_cast<float*>(a), trans_a ? at::IntArrayRef{k, m} : at::IntArrayRef{m, k},
                                {lda, 1}, opts);
  at::Tensor tb = at::from_blob(const_cast<float*>(b), trans_b ? at::IntArrayRef{n, k} : at::IntArrayRef{k, n},
                                {ldb, 1}, opts);
  at::Tensor tc = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (trans_a) ta = ta.t();
  if (trans_b) tb = tb.t();
  if (beta == 0.f) {
    at::mm_out(tc, ta, tb);
    if (alpha != 1.f) tc.mul_(alpha);
  } else {
    tc.mul_(beta).addmm_(ta, tb, 1.f, alpha);
  }
}

// Runs task(t) for t in [0, count) on at::parallel_for's threads, each thread taking the next
// task as it finishes one (causal tasks differ in size; a static split would idle threads).
// `scratch` is constructed once per thread and passed to every task it runs.
template <typename Scratch, typename MakeScratch, typename Task>
void run_tasks(int64_t count, MakeScratch make_scratch, Task task) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      Scratch scratch = make_scratch();
      for (int64_t t = next.fetch_add(1); t < count; t = next.fetch_add(1)) task(t, scratch);
    }
  });
}

// How many keys of the tile starting at key k0 (n keys) the query at sequence position i sees.
inline int64_t seen_keys(bool causal, int64_t i, int64_t k0, int64_t n) {
  return causal ? std::clamp<int64_t>(i - k0 + 1, 0, n) : n;
}

// fp32 [B, N] per-key bias: `seen` (0, or log w) on keys the mask keeps, -inf on padding keys.
inline at::Tensor key_bias(const at::Tensor& seen, const std::optional<at::Tensor>& key_mask) {
  at::Tensor bias = seen.to(at::kFloat).contiguous().clone();
  if (key_mask.has_value()) bias.masked_fill_(key_mask->logical_not(), kNegInf);
  return bias;
}

// ---------------------------------------------------------------------------------------
// exp, vectorized
// ---------------------------------------------------------------------------------------

// exp(x), exactly 0 below -87 and capped at exp(88.3) (finite), as exp8 does.
inline float exp_or_zero(float x) { return x < -87.f ? 0.f : std::exp(std::min(x, 88.3f)); }

#ifdef GLIMPSE_TILES_AVX2
inline bool avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// exp(x) to ~2 ulp (Cephes' polynomial on x - n ln2, n = round(x / ln2)); exactly 0 below
// -87 (incl. -inf), so masked keys contribute nothing; x is capped at 88.3 (2^n stays a
// finite fp32), so the result is never inf.
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  const __m256 zero_below = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(zero_below, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2)));
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

__attribute__((target("avx2,fma"))) inline float hmax8(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#else
inline bool avx2() { return false; }
#endif

// ---------------------------------------------------------------------------------------
// one row of a score tile
// ---------------------------------------------------------------------------------------

// max over j < limit of s[j] + bias[j]; -inf when limit == 0.
inline float biased_max_scalar(const float* s, const float* bias, int64_t limit) {
  float m = kNegInf;
  for (int64_t j = 0; j < limit; ++j) m = std::max(m, s[j] + bias[j]);
  return m;
}

// s[j] <- exp(s[j] + bias[j] - shift) for j < limit, 0 for limit <= j < n; returns the sum.
inline float biased_exp_scalar(float* s, const float* bias, int64_t n, int64_t limit, float shift) {
  float sum = 0.f;
  for (int64_t j = 0; j < limit; ++j) sum += (s[j] = exp_or_zero(s[j] + bias[j] - shift));
  for (int64_t j = limit; j < n; ++j) s[j] = 0.f;
  return sum;
}

#ifdef GLIMPSE_TILES_AVX2
__attribute__((target("avx2,fma"))) inline float biased_max_avx2(const float* s, const float* bias,
                                                                 int64_t limit) {
  __m256 m8 = _mm256_set1_ps(kNegInf);
  int64_t j = 0;
  for (; j + 8 <= limit; j += 8)
    m8 = _mm256_max_ps(m8, _mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(bias + j)));
  return std::max(hmax8(m8), biased_max_scalar(s + j, bias + j, limit - j));
}

__attribute__((target("avx2,fma"))) inline float biased_exp_avx2(float* s, const float* bias, int64_t n,
                                                                int64_t limit, float shift) {
  const __m256 shift8 = _mm256_set1_ps(shift);
  __m256 sum8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= limit; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_add_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(bias + j)), shift8));
    _mm256_storeu_ps(s + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  return hsum8(sum8) + biased_exp_scalar(s + j, bias + j, n - j, limit - j, shift);
}
#endif

inline float biased_max(const float* s, const float* bias, int64_t limit) {
#ifdef GLIMPSE_TILES_AVX2
  if (avx2()) return biased_max_avx2(s, bias, limit);
#endif
  return biased_max_scalar(s, bias, limit);
}

inline float biased_exp(float* s, const float* bias, int64_t n, int64_t limit, float shift) {
#ifdef GLIMPSE_TILES_AVX2
  if (avx2()) return biased_exp_avx2(s, bias, n, limit, shift);
#endif
  return biased_exp_scalar(s, bias, n, limit, shift);
}

// The online-softmax step of one row over one key tile: with the row's running max m and
// sum l, turns s into p = exp(s + bias - m_new) (0 past limit), sets m <- m_new and
// l <- l * exp(m - m_new) + sum p, and returns exp(m - m_new), the factor that rescales
// what the row accumulated so far. A row that has seen nothing yet keeps m = -inf, l = 0.
inline float online_softmax_row(float* s, const float* bias, int64_t n, int64_t limit, float& m,
                                float& l) {
  const float m_new = std::max(m, biased_max(s, bias, limit));
  if (m_new == kNegInf) {  // nothing seen yet: p = 0, nothing to rescale
    std::fill(s, s + n, 0.f);
    return 1.f;
  }
  const float rescale = m == kNegInf ? 0.f : std::exp(m - m_new);
  l = l * rescale + biased_exp(s, bias, n, limit, m_new);
  m = m_new;
  return rescale;
}

// y[d] *= a for d < n.
inline void scale_row(float* y, int64_t n, float a) {
  for (int64_t d = 0; d < n; ++d) y[d] *= a;
}

}  // namespace tiles
}  // namespace glimpse
