// glimpse_prune on CPU: glimpse probabilities of one layer averaged over heads and glimpse
// rows, then select (padding never kept), index and compact, in one native call.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "cpu_kernels.h"

namespace glimpse {

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>
glimpse_prune_cpu(const at::Tensor& q, at::TensorList keys, at::TensorList values,
                  const at::Tensor& key_mask, const at::Tensor& candidate_mask,
                  int64_t score_layer, double scale, std::optional<double> threshold,
                  int64_t max_keep, int64_t min_keep,
                  const std::optional<at::Tensor>& max_keep_per_row,
                  std::optional<int64_t> max_len, bool left_padding) {
  const char* op = "glimpse_prune";
  const int64_t n_layers = static_cast<int64_t>(keys.size());
  GLIMPSE_CHECK_VALUE(score_layer >= 0 && score_layer < n_layers, op,
                      "score_layer must be in [0, ", n_layers, "), got ", score_layer);
  const at::Tensor probs =
      glimpse_scores_cpu(q, keys[score_layer], key_mask, scale, /*normalize=probs*/ 1);
  const int64_t batch = probs.size(0), rows = probs.size(1) * probs.size(2);
  const int64_t seq = probs.size(3);
  at::Tensor scores = at::empty({batch, seq}, probs.options());
  const float* p_ptr = probs.data_ptr<float>();
  float* s_ptr = scores.data_ptr<float>();
  at::parallel_for(0, batch * seq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / seq, j = i % seq;
      float total = 0.f;
      for (int64_t r = 0; r < rows; ++r) total += p_ptr[(b * rows + r) * seq + j];
      s_ptr[i] = total / static_cast<float>(rows);
    }
  });
  const at::Tensor valid = key_mask.contiguous();
  const at::Tensor candidates = candidate_mask.logical_and(valid);
  at::Tensor keep = select_tokens_cpu(scores, candidates, threshold, max_keep, min_keep,
                                      max_keep_per_row);
  keep.logical_and_(valid);
  auto [index, lengths] = keep_index_cpu(keep, max_len, left_padding);
  auto [new_keys, new_values] = compact_kv_cpu(keys, values, index);
  return {new_keys, new_values, index, lengths, scores};
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_glimpse_prune_native", &glimpse::glimpse_prune_cpu);
}
