// soft_mask_attention on CPU: FlashAttention-style tiles, no N x N buffer.
//
// P[i, j] = w_j exp(s_ij) / sum_l w_l exp(s_il) over the keys row i sees is the softmax of
// s + log w, so the forward is an online softmax with the per-key bias log w (-inf for a
// padding key or w = 0). It returns the output and L_i = log sum_l w_l exp(s_il) (+inf for a
// row whose weights sum to 0), which the backward uses to recompute each tile:
//   E = exp(s - L) (0 where not seen), P = w E = exp(s + log w - L), dP = dO V^T,
//   delta_i = dO_i . O_i, G = E (dP - delta), dS = w G = P (dP - delta), dw_j = sum_{h, i} G_ij,
//   dq = scale dS K, dk = scale dS^T Q, dv = P^T dO.
// Tiles are fp32 (fp16/bf16 inputs are widened once, O(N D) memory); products go through
// sgemm, the row operations through AVX2 (attention_tiles.h).
//
// Work split: the forward runs one task per (batch, head, query tile), longest (causal)
// first. The backward runs one task per (batch, KV head, chunk of key tiles): a task owns its
// key tiles' dk, dv and per-KV-head dw rows, and adds dq for the query heads of its KV head
// into its chunk's own fp32 buffer; chunks > 1 only when there are fewer (batch, KV head)
// pairs than threads (at most kMaxChunks: each is a full fp32 dq).
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"
#include "attention_tiles.h"

namespace glimpse {
namespace {

constexpr int64_t kForwardQueryTile = 128;
constexpr int64_t kForwardKeyTile = 256;
constexpr int64_t kBackwardQueryTile = 128;
constexpr int64_t kBackwardKeyTile = 128;
constexpr int64_t kMaxChunks = 4;
constexpr const char* kOp = "soft_mask_attention";

struct Geometry {
  int64_t batch, heads, kv_heads, seq, dim;
  int64_t group() const { return heads / kv_heads; }
};

Geometry check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& key_weight, const std::optional<at::Tensor>& key_mask) {
  GLIMPSE_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() &&
                          q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                          q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                      kOp, "q must be [B, H, N, D] and k, v [B, Hkv, N, D] with H % Hkv == 0, got ",
                      q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  GLIMPSE_CHECK_VALUE(q.numel() > 0 && k.numel() > 0, kOp,
                      "q must be a non-empty [B, H, N, D] and k a non-empty [B, Hkv, N, D], got ",
                      q.sizes(), " and ", k.sizes());
  const auto t = q.scalar_type();
  GLIMPSE_CHECK_TYPE(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, kOp,
                     "the native CPU kernel takes fp32/fp16/bf16 q, got ", t,
                     " (fp64 runs on backend='reference')");
  GLIMPSE_CHECK_TYPE(k.scalar_type() == t && v.scalar_type() == t, kOp,
                     "k and v must have the dtype of q (", t, "), got ", k.scalar_type(), " and ",
                     v.scalar_type());
  GLIMPSE_CHECK_VALUE(key_weight.dim() == 2 && key_weight.size(0) == q.size(0) &&
                          key_weight.size(1) == q.size(2) && key_weight.is_floating_point(),
                      kOp, "key_weight must be float [B, N], got ", key_weight.sizes());
  if (key_mask.has_value()) {
    GLIMPSE_CHECK_VALUE(key_mask->scalar_type() == at::kBool && key_mask->sizes() == key_weight.sizes(),
                        kOp, "key_mask must be bool [B, N], got ", key_mask->sizes());
  }
  return {q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
}

at::Tensor widened(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

struct ForwardScratch {
  std::vector<float> scores, acc, row_max, row_sum;
};

// Backward of one score row, on the keys it sees (j < limit): e = exp(s + bias - L) (bias 0
// or -inf for padding), p = exp(s + log w - L) = w e, g = e (dp - delta); dw += g,
// s <- p (P), dp <- p (dp - delta) (dS = w g). P and dS come from log w, not from w * e: for a
// key with w = 0 whose logit exceeds L by more than fp32's exp range, e overflows and w * e
// would be 0 * inf; only dw, whose true value is that large, saturates. Both 0 past `limit`.
inline void grad_row_scalar(float* s, float* dp, const float* bias, const float* log_w, int64_t n,
                            int64_t limit, float lse, float delta, float* dw) {
  for (int64_t j = 0; j < limit; ++j) {
    const float e = tiles::exp_or_zero(s[j] + bias[j] - lse);
    const float p = tiles::exp_or_zero(s[j] + log_w[j] - lse);
    const float diff = dp[j] - delta;
    dw[j] += e * diff;
    s[j] = p;
    dp[j] = p * diff;
  }
  for (int64_t j = limit; j < n; ++j) s[j] = dp[j] = 0.f;
}

#ifdef GLIMPSE_TILES_AVX2
__attribute__((target("avx2,fma"))) void grad_row_avx2(float* s, float* dp, const float* bias,
                                                       const float* log_w, int64_t n, int64_t limit,
                                                       float lse, float delta, float* dw) {
  const __m256 lse8 = _mm256_set1_ps(lse), delta8 = _mm256_set1_ps(delta);
  int64_t j = 0;
  for (; j + 8 <= limit; j += 8) {
    const __m256 s8 = _mm256_sub_ps(_mm256_loadu_ps(s + j), lse8);
    const __m256 e = tiles::exp8(_mm256_add_ps(s8, _mm256_loadu_ps(bias + j)));
    const __m256 p = tiles::exp8(_mm256_add_ps(s8, _mm256_loadu_ps(log_w + j)));
    const __m256 diff = _mm256_sub_ps(_mm256_loadu_ps(dp + j), delta8);
    _mm256_storeu_ps(dw + j, _mm256_fmadd_ps(e, diff, _mm256_loadu_ps(dw + j)));
    _mm256_storeu_ps(s + j, p);
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(p, diff));
  }
  grad_row_scalar(s + j, dp + j, bias + j, log_w + j, n - j, limit - j, lse, delta, dw + j);
}
#endif

inline void grad_row(float* s, float* dp, const float* bias, const float* log_w, int64_t n,
                     int64_t limit, float lse, float delta, float* dw) {
#ifdef GLIMPSE_TILES_AVX2
  if (tiles::avx2()) return grad_row_avx2(s, dp, bias, log_w, n, limit, lse, delta, dw);
#endif
  grad_row_scalar(s, dp, bias, log_w, n, limit, lse, delta, dw);
}

struct BackwardScratch {
  std::vector<float> scores, d_scores, dk, dv, dw;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> soft_mask_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& key_weight,
    const std::optional<at::Tensor>& key_mask, bool causal, double scale) {
  const Geometry g = check_inputs(q, k, v, key_weight, key_mask);
  const int64_t N = g.seq, D = g.dim;
  const at::Tensor q32 = widened(q), k32 = widened(k), v32 = widened(v);
  const at::Tensor log_weight = tiles::key_bias(key_weight.to(at::kFloat).log(), key_mask);
  at::Tensor out = at::empty({g.batch, g.heads, N, D}, q32.options());
  at::Tensor lse = at::empty({g.batch, g.heads, N}, q32.options());
  const float* qp = q32.const_data_ptr<float>();
  const float* kp = k32.const_data_ptr<float>();
  const float* vp = v32.const_data_ptr<float>();
  const float* bias = log_weight.const_data_ptr<float>();
  float* outp = out.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  const int64_t query_tiles = (N + kForwardQueryTile - 1) / kForwardQueryTile, pairs = g.batch * g.heads;
  const float alpha = static_cast<float>(scale);

  tiles::run_tasks<ForwardScratch>(
      pairs * query_tiles,
      [&] {
        return ForwardScratch{std::vector<float>(kForwardQueryTile * kForwardKeyTile),
                              std::vector<float>(kForwardQueryTile * D), std::vector<float>(kForwardQueryTile),
                              std::vector<float>(kForwardQueryTile)};
      },
      [&](int64_t task, ForwardScratch& sc) {
        const int64_t tile = query_tiles - 1 - task / pairs, bh = task % pairs;  // last tiles first
        const int64_t b = bh / g.heads, kvh = (bh % g.heads) / g.group();
        const int64_t q0 = tile * kForwardQueryTile, nq = std::min(kForwardQueryTile, N - q0);
        const float* qt = qp + (bh * N + q0) * D;
        const float* kb = kp + (b * g.kv_heads + kvh) * N * D;
        const float* vb = vp + (b * g.kv_heads + kvh) * N * D;
        std::fill(sc.acc.begin(), sc.acc.end(), 0.f);
        std::fill(sc.row_max.begin(), sc.row_max.end(), tiles::kNegInf);
        std::fill(sc.row_sum.begin(), sc.row_sum.end(), 0.f);
        const int64_t key_end = causal ? q0 + nq : N;
        for (int64_t k0 = 0; k0 < key_end; k0 += kForwardKeyTile) {
          const int64_t nk = std::min(kForwardKeyTile, key_end - k0);
          float* s = sc.scores.data();
          tiles::gemm(false, true, nq, nk, D, alpha, qt, D, kb + k0 * D, D, 0.f, s, kForwardKeyTile);
          for (int64_t i = 0; i < nq; ++i) {
            const float rescale = tiles::online_softmax_row(
                s + i * kForwardKeyTile, bias + b * N + k0, nk, tiles::seen_keys(causal, q0 + i, k0, nk),
                sc.row_max[i], sc.row_sum[i]);
            if (rescale != 1.f) tiles::scale_row(sc.acc.data() + i * D, D, rescale);
          }
          tiles::gemm(false, false, nq, D, nk, 1.f, s, kForwardKeyTile, vb + k0 * D, D, 1.f,
                      sc.acc.data(), D);
        }
        for (int64_t i = 0; i < nq; ++i) {
          const float l = sc.row_sum[i];
          float* o = outp + (bh * N + q0 + i) * D;
          const float* a = sc.acc.data() + i * D;
          if (l > 0.f) {
            const float inv = 1.f / l;
            for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
            lsep[bh * N + q0 + i] = sc.row_max[i] + std::log(l);
          } else {
            std::fill(o, o + D, 0.f);
            lsep[bh * N + q0 + i] = std::numeric_limits<float>::infinity();
          }
        }
      });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_mask_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& key_weight, const std::optional<at::Tensor>& key_mask, bool causal,
    double scale, const at::Tensor& out, const at::Tensor& lse) {
  const Geometry g = check_inputs(q, k, v, key_weight, key_mask);
  GLIMPSE_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), kOp,
                      "grad_out and out must have q's shape ", q.sizes(), ", got ",
                      grad_out.sizes(), " and ", out.sizes());
  GLIMPSE_CHECK_VALUE(lse.dim() == 3 && lse.sizes() == q.sizes().slice(0, 3), kOp,
                      "lse must be [B, H, N], got ", lse.sizes());
  const int64_t N = g.seq, D = g.dim, G = g.group();
  const at::Tensor q32 = widened(q), k32 = widened(k), v32 = widened(v), do32 = widened(grad_out);
  const at::Tensor lse32 = widened(lse);
  const at::Tensor delta = (do32 * out.to(at::kFloat)).sum(-1).contiguous();
  const at::Tensor bias = tiles::key_bias(at::zeros_like(key_weight, at::kFloat), key_mask);
  const at::Tensor log_weight = tiles::key_bias(key_weight.to(at::kFloat).log(), key_mask);
  const int64_t key_tiles = (N + kBackwardKeyTile - 1) / kBackwardKeyTile;
  const int64_t pairs = g.batch * g.kv_heads;
  // each chunk holds a full fp32 dq: at most kMaxChunks of them
  const int64_t chunks = std::clamp<int64_t>((at::get_num_threads() + pairs - 1) / pairs, 1,
                                             std::min(kMaxChunks, key_tiles));
  at::Tensor dq = at::zeros({chunks, g.batch, g.heads, N, D}, q32.options());
  at::Tensor dk = at::empty({g.batch, g.kv_heads, N, D}, q32.options());
  at::Tensor dv = at::empty_like(dk);
  at::Tensor dw = at::empty({g.batch, g.kv_heads, N}, q32.options());
  const float *qp = q32.const_data_ptr<float>(), *kp = k32.const_data_ptr<float>();
  const float *vp = v32.const_data_ptr<float>(), *dop = do32.const_data_ptr<float>();
  const float *lp = lse32.const_data_ptr<float>(), *deltap = delta.const_data_ptr<float>();
  const float *biasp = bias.const_data_ptr<float>(), *log_wp = log_weight.const_data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  float* dwp = dw.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
  const int64_t tile = kBackwardQueryTile * kBackwardKeyTile;

  tiles::run_tasks<BackwardScratch>(
      pairs * chunks,
      [&] {
        return BackwardScratch{std::vector<float>(tile), std::vector<float>(tile),
                               std::vector<float>(kBackwardKeyTile * D),
                               std::vector<float>(kBackwardKeyTile * D),
                               std::vector<float>(kBackwardKeyTile)};
      },
      [&](int64_t task, BackwardScratch& sc) {
        const int64_t chunk = task / pairs, pair = task % pairs, b = pair / g.kv_heads;
        const float* kb = kp + pair * N * D;
        const float* vb = vp + pair * N * D;
        float* dq_chunk = dqp + chunk * g.batch * g.heads * N * D;
        float *s = sc.scores.data(), *ds = sc.d_scores.data();
        for (int64_t kt = chunk; kt < key_tiles; kt += chunks) {
          const int64_t k0 = kt * kBackwardKeyTile, nk = std::min(kBackwardKeyTile, N - k0);
          std::fill(sc.dk.begin(), sc.dk.end(), 0.f);
          std::fill(sc.dv.begin(), sc.dv.end(), 0.f);
          std::fill(sc.dw.begin(), sc.dw.end(), 0.f);
          for (int64_t hg = 0; hg < G; ++hg) {
            const int64_t bh = b * g.heads + (pair % g.kv_heads) * G + hg;
            for (int64_t q0 = causal ? k0 / kBackwardQueryTile * kBackwardQueryTile : 0; q0 < N; q0 += kBackwardQueryTile) {
              const int64_t nq = std::min(kBackwardQueryTile, N - q0);
              const float* qt = qp + (bh * N + q0) * D;
              const float* dot = dop + (bh * N + q0) * D;
              tiles::gemm(false, true, nq, nk, D, alpha, qt, D, kb + k0 * D, D, 0.f, s, kBackwardKeyTile);
              tiles::gemm(false, true, nq, nk, D, 1.f, dot, D, vb + k0 * D, D, 0.f, ds, kBackwardKeyTile);
              for (int64_t i = 0; i < nq; ++i) {
                const int64_t row = bh * N + q0 + i;
                grad_row(s + i * kBackwardKeyTile, ds + i * kBackwardKeyTile, biasp + b * N + k0,
                         log_wp + b * N + k0, nk, tiles::seen_keys(causal, q0 + i, k0, nk), lp[row], deltap[row],
                         sc.dw.data());
              }
              tiles::gemm(true, false, nk, D, nq, 1.f, s, kBackwardKeyTile, dot, D, 1.f, sc.dv.data(), D);
              tiles::gemm(true, false, nk, D, nq, alpha, ds, kBackwardKeyTile, qt, D, 1.f, sc.dk.data(), D);
              tiles::gemm(false, false, nq, D, nk, alpha, ds, kBackwardKeyTile, kb + k0 * D, D, 1.f,
                          dq_chunk + (bh * N + q0) * D, D);
            }
          }
          std::copy(sc.dk.begin(), sc.dk.begin() + nk * D, dkp + (pair * N + k0) * D);
          std::copy(sc.dv.begin(), sc.dv.begin() + nk * D, dvp + (pair * N + k0) * D);
          std::copy(sc.dw.begin(), sc.dw.begin() + nk, dwp + pair * N + k0);
        }
      });
  const at::Tensor dq_total = chunks > 1 ? dq.sum(0) : dq.select(0, 0);
  return {dq_total.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()),
          dw.sum(1).to(key_weight.scalar_type())};
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_soft_mask_attention_forward_native", &glimpse::soft_mask_attention_forward_cpu);
  m.impl("_soft_mask_attention_backward_native", &glimpse::soft_mask_attention_backward_cpu);
}
