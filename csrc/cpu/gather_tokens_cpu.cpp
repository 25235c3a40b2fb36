// gather_tokens on CPU: one memcpy per output token (any dtype: rows are copied as bytes).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cstring>

#include "../common/checks.h"
#include "cpu_kernels.h"

namespace glimpse {

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& index,
                             const at::Scalar& pad_value) {
  const char* op = "gather_tokens";
  GLIMPSE_CHECK_VALUE(x.dim() >= 2, op, "x must be [B, S, ...], got ", x.sizes());
  GLIMPSE_CHECK_TYPE(index.scalar_type() == at::kLong && index.dim() == 2 &&
                         index.size(0) == x.size(0),
                     op, "index must be int64 [B, Lmax], got ", index.scalar_type(), " ",
                     index.sizes());
  const int64_t batch = x.size(0), seq = x.size(1), out_len = index.size(1);
  const at::Tensor idx = index.contiguous();
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i) {
    GLIMPSE_CHECK_VALUE(idx_ptr[i] >= -1 && idx_ptr[i] < seq, op,
                        "index values must be in [-1, S) = [-1, ", seq, "), got ", idx_ptr[i]);
  }
  const at::Tensor src = x.contiguous();
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape[1] = out_len;
  at::Tensor out = at::empty(out_shape, x.options());
  const int64_t inner = seq > 0 ? src.numel() / (batch * seq) : 0;
  const at::Tensor pad_row = at::full({inner}, pad_value, x.options());
  const size_t row_bytes = static_cast<size_t>(inner) * x.element_size();
  const char* src_ptr = static_cast<const char*>(src.const_data_ptr());
  const char* pad_ptr = static_cast<const char*>(pad_row.const_data_ptr());
  char* out_ptr = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, batch * out_len, kCopyGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / out_len, source = idx_ptr[r];
      const char* from = source < 0 ? pad_ptr : src_ptr + (b * seq + source) * row_bytes;
      std::memcpy(out_ptr + r * row_bytes, from, row_bytes);
    }
  });
  return out;
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_gather_tokens_native", &glimpse::gather_tokens_cpu);
}
