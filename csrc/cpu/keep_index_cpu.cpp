// keep_index on CPU: row lengths, an overflow check against max_len, then the positions.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"
#include "cpu_kernels.h"

namespace glimpse {

std::tuple<at::Tensor, at::Tensor> keep_index_cpu(const at::Tensor& keep,
                                                  std::optional<int64_t> max_len,
                                                  bool left_padding) {
  const char* op = "keep_index";
  GLIMPSE_CHECK_TYPE(keep.scalar_type() == at::kBool && keep.dim() == 2, op,
                     "keep must be bool [B, S], got ", keep.scalar_type(), " ", keep.sizes());
  GLIMPSE_CHECK_VALUE(!max_len.has_value() || *max_len >= 1, op,
                      "max_len must be >= 1 or None, got ", max_len.value_or(0));
  const int64_t batch = keep.size(0), seq = keep.size(1);
  const at::Tensor k = keep.contiguous();
  const bool* k_ptr = k.data_ptr<bool>();
  at::Tensor lengths = at::empty({batch}, keep.options().dtype(at::kLong));
  int64_t* len_ptr = lengths.data_ptr<int64_t>();
  at::parallel_for(0, batch, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t n = 0;
      for (int64_t j = 0; j < seq; ++j) n += k_ptr[b * seq + j];
      len_ptr[b] = n;
    }
  });
  const int64_t* longest = std::max_element(len_ptr, len_ptr + batch);
  const int64_t longest_len = batch > 0 ? *longest : 0;
  const int64_t out_len = max_len.value_or(longest_len);
  GLIMPSE_CHECK_VALUE(longest_len <= out_len, op, "every row must keep at most max_len=",
                      out_len, " tokens, got ", longest_len, " in row ", longest - len_ptr);
  at::Tensor index = at::full({batch, out_len}, -1, keep.options().dtype(at::kLong));
  int64_t* idx_ptr = index.data_ptr<int64_t>();
  at::parallel_for(0, batch, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t slot = left_padding ? out_len - len_ptr[b] : 0;
      int64_t* row = idx_ptr + b * out_len;
      for (int64_t j = 0; j < seq; ++j) {
        if (k_ptr[b * seq + j]) row[slot++] = j;
      }
    }
  });
  return {index, lengths};
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_keep_index_native", &glimpse::keep_index_cpu);
}
