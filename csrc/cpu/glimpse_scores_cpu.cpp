// glimpse_scores on CPU: K is read once per KV head group. Keys are processed in tiles of
// kTile, transposed to fp32 so that the inner loop over the tile vectorizes, and every
// query row of the group (H/Hkv heads x G glimpse rows) is scored against the tile.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../common/checks.h"
#include "cpu_kernels.h"

namespace glimpse {
namespace {

constexpr int64_t kTile = 16;

template <typename scalar_t>
void score_tile(const float* q_group, int64_t rows, int64_t dim, const scalar_t* k_base,
                int64_t seq_stride, int64_t first_key, int64_t n_keys, const bool* valid,
                float* out_group, int64_t seq, float* k_tile) {
  for (int64_t jj = 0; jj < n_keys; ++jj) {
    const scalar_t* k_row = k_base + (first_key + jj) * seq_stride;
    for (int64_t d = 0; d < dim; ++d) k_tile[d * kTile + jj] = static_cast<float>(k_row[d]);
  }
  for (int64_t jj = n_keys; jj < kTile; ++jj) {
    for (int64_t d = 0; d < dim; ++d) k_tile[d * kTile + jj] = 0.f;
  }
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const float* q_row = q_group + r * dim;
    float acc[kTile] = {0.f};
    for (int64_t d = 0; d < dim; ++d) {
      const float qd = q_row[d];
      const float* kt = k_tile + d * kTile;
      for (int64_t jj = 0; jj < kTile; ++jj) acc[jj] += qd * kt[jj];
    }
    float* out_row = out_group + r * seq + first_key;
    for (int64_t jj = 0; jj < n_keys; ++jj) {
      out_row[jj] = (valid == nullptr || valid[first_key + jj]) ? acc[jj] : neg_inf;
    }
  }
}

void normalize_rows(float* logits, int64_t n_rows, int64_t seq, int64_t normalize) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, n_rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = logits + r * seq;
      float row_max = neg_inf;
      for (int64_t j = 0; j < seq; ++j) row_max = std::max(row_max, row[j]);
      if (row_max == neg_inf) {  // no valid key: probs 0, log_probs -inf
        if (normalize == 1) std::fill(row, row + seq, 0.f);
        continue;
      }
      double total = 0.0;
      for (int64_t j = 0; j < seq; ++j) total += std::exp(row[j] - row_max);
      const float lse = row_max + static_cast<float>(std::log(total));
      for (int64_t j = 0; j < seq; ++j) {
        row[j] = normalize == 1 ? std::exp(row[j] - lse) : row[j] - lse;
      }
    }
  });
}

}  // namespace

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
  const int64_t batch = q.size(0), heads = q.size(1), glimpses = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), seq = k.size(2);
  const int64_t rows = (heads / kv_heads) * glimpses;  // query rows per KV head
  at::Tensor mask;
  if (key_mask.has_value()) {
    mask = key_mask->contiguous();
    GLIMPSE_CHECK_VALUE(mask.scalar_type() == at::kBool && mask.dim() == 2 &&
                            mask.size(0) == batch && mask.size(1) == seq,
                        op, "key_mask must be bool [B, S], got ", mask.sizes());
  }
  const at::Tensor q_scaled = (q.to(at::kFloat) * scale).contiguous();
  const at::Tensor keys = k.stride(3) == 1 ? k : k.contiguous();
  at::Tensor out = at::empty({batch, heads, glimpses, seq}, q.options().dtype(at::kFloat));
  const float* q_ptr = q_scaled.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  const bool* mask_ptr = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t n_tiles = (seq + kTile - 1) / kTile;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "glimpse_scores_cpu", [&] {
    const scalar_t* k_ptr = keys.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch * kv_heads * n_tiles, kCopyGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> k_tile(dim * kTile);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t tile = w % n_tiles, bh = w / n_tiles;
        const int64_t b = bh / kv_heads, kvh = bh % kv_heads;
        const int64_t first_key = tile * kTile;
        score_tile<scalar_t>(q_ptr + bh * rows * dim, rows, dim,
                             k_ptr + b * keys.stride(0) + kvh * keys.stride(1), keys.stride(2),
                             first_key, std::min(kTile, seq - first_key),
                             mask_ptr ? mask_ptr + b * seq : nullptr,
                             out_ptr + bh * rows * seq, seq, k_tile.data());
      }
    });
  });
  if (normalize != 0) normalize_rows(out_ptr, batch * heads * glimpses, seq, normalize);
  return out;
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_glimpse_scores_native", &glimpse::glimpse_scores_cpu);
}
