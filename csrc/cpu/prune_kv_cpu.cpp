// prune_kv on CPU: select_tokens, keep_index and compact_kv in one native call.
#include <torch/library.h>

#include "../common/checks.h"
#include "cpu_kernels.h"

namespace glimpse {

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>
prune_kv_cpu(const at::Tensor& scores, const at::Tensor& candidate_mask, at::TensorList keys,
             at::TensorList values, std::optional<double> threshold, int64_t max_keep,
             int64_t min_keep, const std::optional<at::Tensor>& max_keep_per_row,
             std::optional<int64_t> max_len, bool left_padding) {
  at::Tensor keep =
      select_tokens_cpu(scores, candidate_mask, threshold, max_keep, min_keep, max_keep_per_row);
  auto [index, lengths] = keep_index_cpu(keep, max_len, left_padding);
  auto [new_keys, new_values] = compact_kv_cpu(keys, values, index);
  return {new_keys, new_values, index, lengths, keep};
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_prune_kv_native", &glimpse::prune_kv_cpu);
}
