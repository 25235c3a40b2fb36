// attention_column_scores on CPU: out[b, h, j] = sum over the selected query rows i of the
// softmax probability P[b, h, i, j], in tiles, never an S x S buffer.
//
// The selected rows of each batch are packed first (fp32 [B, H, R, D], R the largest count),
// with their sequence positions for the causal cut, so unselected rows cost nothing (ATP's
// S_cross selects only the text rows). Two passes over the score tiles:
//   1. per (batch, head, row tile): each row's log-sum-exp L over the keys it sees
//      (online max and sum; +inf for a row that sees no key, so it adds nothing);
//   2. per (batch, head, key tile): exp(s - L) summed over the rows, each task owning
//      its columns (no atomics).
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"
#include "attention_tiles.h"

namespace glimpse {
namespace {

constexpr int64_t kRowTile = 64;
constexpr int64_t kKeyTile = 128;
constexpr const char* kOp = "attention_column_scores";

struct PackedRows {
  at::Tensor q;          // fp32 [B, H, R, D], rows past a batch's count are zero
  std::vector<int64_t> position;  // [B * R]: each packed row's sequence position
  std::vector<int64_t> count;     // [B]: selected rows per batch
  int64_t rows;                   // R
};

PackedRows pack_selected_rows(const at::Tensor& q, const std::optional<at::Tensor>& query_mask) {
  const int64_t batch = q.size(0), heads = q.size(1), seq = q.size(2), dim = q.size(3);
  PackedRows packed;
  packed.count.assign(batch, seq);
  if (!query_mask.has_value()) {
    packed.rows = seq;
    packed.position.resize(batch * seq);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < seq; ++i) packed.position[b * seq + i] = i;
    packed.q = q.to(at::kFloat).contiguous();
    return packed;
  }
  const at::Tensor mask = query_mask->contiguous();
  const bool* selected = mask.const_data_ptr<bool>();
  packed.rows = 0;
  for (int64_t b = 0; b < batch; ++b) {
    packed.count[b] = std::count(selected + b * seq, selected + (b + 1) * seq, true);
    packed.rows = std::max(packed.rows, packed.count[b]);
  }
  packed.position.assign(batch * std::max<int64_t>(packed.rows, 1), 0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0, r = 0; i < seq; ++i)
      if (selected[b * seq + i]) packed.position[b * packed.rows + r++] = i;
  const at::Tensor q32 = q.to(at::kFloat).contiguous();
  packed.q = at::zeros({batch, heads, packed.rows, dim}, q32.options());
  const float* src = q32.const_data_ptr<float>();
  float* dst = packed.q.data_ptr<float>();
  const int64_t rows = packed.rows;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads;
      for (int64_t r = 0; r < packed.count[b]; ++r)
        std::copy_n(src + (bh * seq + packed.position[b * rows + r]) * dim, dim, dst + (bh * rows + r) * dim);
    }
  });
  return packed;
}

}  // namespace

at::Tensor attention_column_scores_cpu(const at::Tensor& q, const at::Tensor& k,
                                       const std::optional<at::Tensor>& query_mask,
                                       const std::optional<at::Tensor>& key_mask, bool causal,
                                       double scale) {
  GLIMPSE_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) &&
                          q.size(2) == k.size(2) && q.size(3) == k.size(3) && k.size(1) > 0 &&
                          q.size(1) % k.size(1) == 0,
                      kOp, "q must be [B, H, S, D] and k [B, Hkv, S, D] with H % Hkv == 0, got ",
                      q.sizes(), " and ", k.sizes());
  GLIMPSE_CHECK_VALUE(q.numel() > 0 && k.numel() > 0, kOp,
                      "q must be a non-empty [B, H, S, D] and k a non-empty [B, Hkv, S, D], got ",
                      q.sizes(), " and ", k.sizes());
  const auto t = q.scalar_type();
  GLIMPSE_CHECK_TYPE((t == at::kFloat || t == at::kHalf || t == at::kBFloat16) && k.scalar_type() == t,
                     kOp, "the native CPU kernel takes fp32/fp16/bf16 q and k of one dtype, got ", t,
                     " and ", k.scalar_type(), " (fp64 runs on backend='reference')");
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k.size(1), seq = q.size(2);
  const int64_t dim = q.size(3), group = heads / kv_heads;
  for (const auto* mask : {&query_mask, &key_mask}) {
    if (mask->has_value()) {
      GLIMPSE_CHECK_VALUE((*mask)->scalar_type() == at::kBool && (*mask)->dim() == 2 &&
                              (*mask)->size(0) == batch && (*mask)->size(1) == seq,
                          kOp, "query_mask and key_mask must be bool [B, S], got ", (*mask)->sizes());
    }
  }
  const PackedRows packed = pack_selected_rows(q, query_mask);
  const int64_t rows = packed.rows;
  const at::Tensor k32 = k.to(at::kFloat).contiguous();
  const at::Tensor bias = tiles::key_bias(at::zeros({batch, seq}, k32.options()), key_mask);
  at::Tensor lse = at::empty({batch, heads, std::max<int64_t>(rows, 1)}, k32.options());
  at::Tensor out = at::empty({batch, heads, seq}, k32.options());
  const float *qp = packed.q.const_data_ptr<float>(), *kp = k32.const_data_ptr<float>();
  const float* biasp = bias.const_data_ptr<float>();
  float *lsep = lse.data_ptr<float>(), *outp = out.data_ptr<float>();
  const int64_t* position = packed.position.data();
  const float alpha = static_cast<float>(scale);
  const int64_t pairs = batch * heads;
  const int64_t row_tiles = (rows + kRowTile - 1) / kRowTile, key_tiles = (seq + kKeyTile - 1) / kKeyTile;
  auto make_tile = [] { return std::vector<float>(kRowTile * kKeyTile); };

  // 1. the log-sum-exp of every packed row
  tiles::run_tasks<std::vector<float>>(pairs * row_tiles, make_tile, [&](int64_t task, std::vector<float>& s) {
    const int64_t tile = row_tiles - 1 - task / pairs, bh = task % pairs, b = bh / heads;
    const int64_t r0 = tile * kRowTile, nr = std::max<int64_t>(0, std::min(kRowTile, packed.count[b] - r0));
    const int64_t* pos = position + b * rows + r0;
    const float* kb = kp + (b * kv_heads + (bh % heads) / group) * seq * dim;
    float row_max[kRowTile], row_sum[kRowTile];
    std::fill_n(row_max, kRowTile, tiles::kNegInf);
    std::fill_n(row_sum, kRowTile, 0.f);
    const int64_t key_end = nr == 0 ? 0 : causal ? pos[nr - 1] + 1 : seq;
    for (int64_t k0 = 0; k0 < key_end; k0 += kKeyTile) {
      const int64_t nk = std::min(kKeyTile, key_end - k0);
      tiles::gemm(false, true, nr, nk, dim, alpha, qp + (bh * rows + r0) * dim, dim, kb + k0 * dim, dim, 0.f,
                  s.data(), kKeyTile);
      for (int64_t r = 0; r < nr; ++r)
        tiles::online_softmax_row(s.data() + r * kKeyTile, biasp + b * seq + k0, nk,
                                  tiles::seen_keys(causal, pos[r], k0, nk), row_max[r], row_sum[r]);
    }
    for (int64_t r = 0; r < nr; ++r)
      lsep[bh * rows + r0 + r] =
          row_sum[r] > 0.f ? row_max[r] + std::log(row_sum[r]) : std::numeric_limits<float>::infinity();
  });

  // 2. column sums of exp(s - L), one task per key tile
  tiles::run_tasks<std::vector<float>>(pairs * key_tiles, make_tile, [&](int64_t task, std::vector<float>& s) {
    const int64_t tile = task / pairs, bh = task % pairs, b = bh / heads;
    const int64_t k0 = tile * kKeyTile, nk = std::min(kKeyTile, seq - k0);
    const int64_t* pos = position + b * rows;
    const float* kb = kp + ((b * kv_heads + (bh % heads) / group) * seq + k0) * dim;
    float* col = outp + bh * seq + k0;
    std::fill_n(col, nk, 0.f);
    // causal: only rows at positions >= k0 see this tile (positions ascend)
    const int64_t first = causal ? std::lower_bound(pos, pos + packed.count[b], k0) - pos : 0;
    for (int64_t r0 = first; r0 < packed.count[b]; r0 += kRowTile) {
      const int64_t nr = std::min(kRowTile, packed.count[b] - r0);
      tiles::gemm(false, true, nr, nk, dim, alpha, qp + (bh * rows + r0) * dim, dim, kb, dim, 0.f, s.data(),
                  kKeyTile);
      for (int64_t r = 0; r < nr; ++r) {
        float* row = s.data() + r * kKeyTile;
        tiles::biased_exp(row, biasp + b * seq + k0, nk, tiles::seen_keys(causal, pos[r0 + r], k0, nk),
                          lsep[bh * rows + r0 + r]);
        for (int64_t j = 0; j < nk; ++j) col[j] += row[j];
      }
    }
  });
  return out;
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_attention_column_scores_native", &glimpse::attention_column_scores_cpu);
}
