// compact_kv on CPU: every layer's K and V in one parallel loop over (tensor, b, head);
// each kept token is one memcpy of D elements, pad slots are zeroed.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../common/checks.h"
#include "cpu_kernels.h"

namespace glimpse {

constexpr int64_t kPrefetchRows = 8;

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> compact_kv_cpu(
    at::TensorList keys, at::TensorList values, const at::Tensor& index) {
  const char* op = "compact_kv";
  GLIMPSE_CHECK_VALUE(keys.size() == values.size(), op,
                      "keys and values must have the same length, got ", keys.size(), " and ",
                      values.size());
  GLIMPSE_CHECK_TYPE(index.scalar_type() == at::kLong && index.dim() == 2, op,
                     "index must be int64 [B, Lmax], got ", index.scalar_type(), " ",
                     index.sizes());
  const int64_t n_layers = static_cast<int64_t>(keys.size());
  if (n_layers == 0) return {{}, {}};
  const at::Tensor& first = keys[0];
  GLIMPSE_CHECK_VALUE(first.dim() == 4 && index.size(0) == first.size(0), op,
                      "keys[0] must be [B, Hkv, S, D] with B = index.size(0), got ",
                      first.sizes());
  const int64_t batch = first.size(0), heads = first.size(1), seq = first.size(2);
  const int64_t out_len = index.size(1);
  const at::Tensor idx = index.contiguous();
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    GLIMPSE_CHECK_VALUE(idx_ptr[i] >= -1 && idx_ptr[i] < seq, op,
                        "index values must be in [-1, S) = [-1, ", seq, "), got ", idx_ptr[i]);
  }

  // Sources keep their strides over (B, Hkv, S); only the head dim must be contiguous.
  std::vector<at::Tensor> sources, outputs;
  for (int64_t t = 0; t < 2 * n_layers; ++t) {
    const at::Tensor& src = t < n_layers ? keys[t] : values[t - n_layers];
    GLIMPSE_CHECK_VALUE(src.dim() == 4 && src.size(0) == batch && src.size(1) == heads &&
                            src.size(2) == seq && src.scalar_type() == first.scalar_type(),
                        op, "every key and value must be [B, Hkv, S, D] like keys[0] ",
                        first.sizes(), ", got ", src.sizes());
    sources.push_back(src.stride(3) == 1 ? src : src.contiguous());
    outputs.push_back(at::empty({batch, heads, out_len, src.size(3)}, src.options()));
  }
  const int64_t elem = first.element_size();
  at::parallel_for(0, 2 * n_layers * batch * heads, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / (batch * heads), b = (w / heads) % batch, h = w % heads;
      const at::Tensor& src = sources[t];
      const int64_t dim = src.size(3);
      const size_t row_bytes = static_cast<size_t>(dim * elem);
      const char* base = static_cast<const char*>(src.const_data_ptr()) +
                         (b * src.stride(0) + h * src.stride(1)) * elem;
      const int64_t seq_stride = src.stride(2) * elem;
      char* dst = static_cast<char*>(outputs[t].data_ptr()) +
                  ((b * heads + h) * out_len) * row_bytes;
      const int64_t* row_idx = idx_ptr + b * out_len;
      for (int64_t i = 0; i < out_len; ++i) {
        // Kept rows are scattered: prefetch a few rows ahead to hide memory latency.
        if (i + kPrefetchRows < out_len && row_idx[i + kPrefetchRows] >= 0) {
          const char* ahead = base + row_idx[i + kPrefetchRows] * seq_stride;
          for (size_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(ahead + line);
        }
        if (row_idx[i] < 0) {
          std::memset(dst + i * row_bytes, 0, row_bytes);
        } else {
          std::memcpy(dst + i * row_bytes, base + row_idx[i] * seq_stride, row_bytes);
        }
      }
    }
  });
  std::vector<at::Tensor> new_keys(outputs.begin(), outputs.begin() + n_layers);
  std::vector<at::Tensor> new_values(outputs.begin() + n_layers, outputs.end());
  return {new_keys, new_values};
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_compact_kv_native", &glimpse::compact_kv_cpu);
}
