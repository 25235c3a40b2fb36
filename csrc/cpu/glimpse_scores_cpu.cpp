// glimpse_scores on CPU: one fp32 GEMM per KV head group, [H/Hkv * G, D] x [D, S], so K is
// read once and never repeated per query head; masking and the (log-)softmax over valid
// keys use ATen's vectorized softmax.
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../common/checks.h"
#include "cpu_kernels.h"

namespace glimpse {

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
  // Heads of one KV group are adjacent, so [B, H, G, D] views as [B, Hkv, rows, D].
  const at::Tensor q_group =
      (q.to(at::kFloat) * scale).contiguous().view({batch, kv_heads, rows, dim});
  at::Tensor out = at::matmul(q_group, k.to(at::kFloat).transpose(-1, -2))
                       .view({batch, heads, glimpses, seq});
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
