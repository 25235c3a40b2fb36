// Host functions of the C++ CPU kernels, one per op file, shared by the fused ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace glimpse {

at::Tensor select_tokens_cpu(const at::Tensor& scores, const at::Tensor& candidate_mask,
                             std::optional<double> threshold, int64_t max_keep,
                             int64_t min_keep,
                             const std::optional<at::Tensor>& max_keep_per_row);

std::tuple<at::Tensor, at::Tensor> keep_index_cpu(const at::Tensor& keep,
                                                  std::optional<int64_t> max_len,
                                                  bool left_padding);

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& index,
                             const at::Scalar& pad_value);

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> compact_kv_cpu(
    at::TensorList keys, at::TensorList values, const at::Tensor& index);

void compact_kv_into_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& index,
                         at::TensorList out_keys, at::TensorList out_values);

// normalize: 0 logits, 1 probs, 2 log_probs.
at::Tensor glimpse_scores_cpu(const at::Tensor& q, const at::Tensor& k,
                              const std::optional<at::Tensor>& key_mask, double scale,
                              int64_t normalize);

}  // namespace glimpse
