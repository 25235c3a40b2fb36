// glimpse_scores on CPU: the logits of every query row of a KV head group against each key,
// so K is read once and never repeated per query head; masking and the (log-)softmax over
// valid keys use ATen's vectorized softmax.
//
// The logits: on an AVX2 + FMA CPU with bf16 or fp32 keys, one pass over K that widens each
// key row to fp32 in registers and takes its dot products with the group's query rows (no
// fp32 copy of K: that copy, a fresh buffer twice K's size, cost more than the products).
// Elsewhere one fp32 GEMM per group, [H/Hkv * G, D] x [D, S].
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/softmax.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GLIMPSE_HAS_AVX2_PATH 1
#endif

#include "../common/checks.h"
#include "cpu_kernels.h"

namespace glimpse {

#ifdef GLIMPSE_HAS_AVX2_PATH
namespace {

constexpr int64_t kKeysPerTask = 256;

// One key row (dim elements, dim % 8 == 0) widened to fp32 into `row`.
__attribute__((target("avx2,fma"))) inline void widen_row(const uint16_t* bf16, float* row,
                                                          int64_t dim) {
  for (int64_t d = 0; d < dim; d += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bf16 + d));
    const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16);
    _mm256_storeu_ps(row + d, _mm256_castsi256_ps(wide));
  }
}

// The dot products of 4 query rows (q, q + dim, ...) with one fp32 key row: four independent
// FMA chains (one chain per product would wait on each FMA's latency), then one reduction.
__attribute__((target("avx2,fma"))) inline __m128 dot4(const float* q, const float* key,
                                                      int64_t dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; d += 8) {
    const __m256 kv = _mm256_loadu_ps(key + d);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), kv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + dim + d), kv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 2 * dim + d), kv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 3 * dim + d), kv, a3);
  }
  // lanes of hadd(hadd(a0, a1), hadd(a2, a3)): the 4 sums split over the two 128-bit halves
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// logits[b, kvh, r, s] = q_scaled[b, kvh, r, :] . k[b, kvh, s, :] for keys [s_begin, s_end);
// q holds the group's rows padded with zero rows to a multiple of 4 (rows_padded).
__attribute__((target("avx2,fma"))) void logits_avx2(const float* q, const at::Tensor& k,
                                                     float* out, int64_t b, int64_t kvh,
                                                     int64_t rows, int64_t rows_padded,
                                                     int64_t s_begin, int64_t s_end) {
  const int64_t dim = k.size(3), seq = k.size(2);
  const bool bf16 = k.scalar_type() == at::kBFloat16;
  const int64_t elem = k.element_size();
  const char* base = static_cast<const char*>(k.const_data_ptr()) +
                     (b * k.stride(0) + kvh * k.stride(1)) * elem;
  const float* q_group = q + (b * k.size(1) + kvh) * rows_padded * dim;
  float* out_group = out + (b * k.size(1) + kvh) * rows * seq;
  alignas(32) float row[512];
  alignas(16) float sums[4];
  for (int64_t s = s_begin; s < s_end; ++s) {
    const char* key = base + s * k.stride(2) * elem;
    const float* widened = reinterpret_cast<const float*>(key);
    if (bf16) {
      widen_row(reinterpret_cast<const uint16_t*>(key), row, dim);
      widened = row;
    }
    for (int64_t r = 0; r < rows; r += 4) {
      _mm_store_ps(sums, dot4(q_group + r * dim, widened, dim));
      for (int64_t i = 0; i < 4 && r + i < rows; ++i) out_group[(r + i) * seq + s] = sums[i];
    }
  }
}

bool avx2_path(const at::Tensor& k) {
  static const bool cpu_has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const auto t = k.scalar_type();
  return cpu_has && (t == at::kBFloat16 || t == at::kFloat) && k.size(3) % 8 == 0 &&
         k.size(3) <= 512 && k.stride(3) == 1;
}

}  // namespace
#endif

// fp32 logits [B, H, G, S] = scale * q k^T per KV head group.
static at::Tensor group_logits(const at::Tensor& q, const at::Tensor& k, double scale) {
  const int64_t batch = q.size(0), heads = q.size(1), glimpses = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), seq = k.size(2);
  const int64_t rows = (heads / kv_heads) * glimpses;  // query rows per KV head
  // Heads of one KV group are adjacent, so [B, H, G, D] views as [B, Hkv, rows, D].
  const at::Tensor q_group =
      (q.to(at::kFloat) * scale).contiguous().view({batch, kv_heads, rows, dim});
#ifdef GLIMPSE_HAS_AVX2_PATH
  if (avx2_path(k)) {
    const int64_t rows_padded = (rows + 3) / 4 * 4;
    const at::Tensor q_padded =
        at::constant_pad_nd(q_group, {0, 0, 0, rows_padded - rows}, 0.0).contiguous();
    at::Tensor out = at::empty({batch, heads, glimpses, seq}, q_group.options());
    const float* q_ptr = q_padded.const_data_ptr<float>();
    float* out_ptr = out.data_ptr<float>();
    const int64_t chunks = (seq + kKeysPerTask - 1) / kKeysPerTask;
    at::parallel_for(0, batch * kv_heads * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const int64_t c = w % chunks, bh = w / chunks;
        const int64_t s0 = c * kKeysPerTask;
        logits_avx2(q_ptr, k, out_ptr, bh / kv_heads, bh % kv_heads, rows, rows_padded, s0,
                    std::min(seq, s0 + kKeysPerTask));
      }
    });
    return out;
  }
#endif
  return at::matmul(q_group, k.to(at::kFloat).transpose(-1, -2)).view({batch, heads, glimpses, seq});
}

at::Tensor glimpse_scores_cpu(const at::Tensor& q, const at::Tensor& k,
                              const std::optional<at::Tensor>& key_mask, double scale,
                              int64_t normalize) {
  const char* op = "glimpse_scores";
  GLIMPSE_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) &&
                          q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                      op, "q must be [B, H, G, D] and k [B, Hkv, S, D] with H % Hkv == 0, got ",
                      q.sizes(), " and ", k.sizes());
  GLIMPSE_CHECK_TYPE(q.scalar_type() == k.scalar_type(), op,
                     "q and k must share a dtype, got ", q.scalar_type(), " and ",
                     k.scalar_type());
  GLIMPSE_CHECK_VALUE(normalize >= 0 && normalize <= 2, op,
                      "normalize must be 0 (logits), 1 (probs) or 2 (log_probs), got ",
                      normalize);
  const int64_t batch = q.size(0), seq = k.size(2);
  at::Tensor mask;
  if (key_mask.has_value()) {
    mask = key_mask->contiguous();
    GLIMPSE_CHECK_VALUE(mask.scalar_type() == at::kBool && mask.dim() == 2 &&
                            mask.size(0) == batch && mask.size(1) == seq,
                        op, "key_mask must be bool [B, S], got ", mask.sizes());
  }
  at::Tensor out = group_logits(q, k, scale);
  if (!mask.defined()) {
    if (normalize == 1) return at::softmax(out, -1);
    return normalize == 2 ? at::log_softmax(out, -1) : out;
  }
  const at::Tensor invalid = mask.logical_not().view({batch, 1, 1, seq});
  out.masked_fill_(invalid, -std::numeric_limits<float>::infinity());
  if (normalize == 0) return out;
  // A row without any valid key would give NaN: probs 0 / log_probs -inf there.
  const at::Tensor empty_row = invalid.all(-1, /*keepdim=*/true);
  if (normalize == 1) return at::softmax(out, -1).masked_fill_(empty_row, 0.f);
  return at::log_softmax(out, -1).masked_fill_(empty_row, -std::numeric_limits<float>::infinity());
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_glimpse_scores_native", &glimpse::glimpse_scores_cpu);
}
