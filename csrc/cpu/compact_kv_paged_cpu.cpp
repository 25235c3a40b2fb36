// compact_kv_paged on CPU: in every layer's paged cache [num_blocks, Hkv, block_size, C],
// each request's kept rows move to its first rows, in place. One parallel task per
// (layer, request, head) copies C-wide rows (K and V side by side) as bytes, in ascending
// row order: positions ascend, so index[i] >= i and a row read is never one written before.
// Tasks touch disjoint memory (distinct caches, blocks no two rows share, another head).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/checks.h"

namespace glimpse {

void compact_kv_paged_cpu(at::TensorList caches, const at::Tensor& block_table,
                          const at::Tensor& index) {
  const char* op = "compact_kv_paged";
  GLIMPSE_CHECK_TYPE(block_table.scalar_type() == at::kInt && block_table.dim() == 2, op,
                     "block_table must be int32 [P, max_blocks], got ",
                     block_table.scalar_type(), " ", block_table.sizes());
  GLIMPSE_CHECK_TYPE(index.scalar_type() == at::kLong && index.dim() == 2 &&
                         index.size(0) == block_table.size(0),
                     op, "index must be int64 [P, Lmax] with P = block_table.size(0), got ",
                     index.scalar_type(), " ", index.sizes());
  if (caches.empty() || index.numel() == 0) return;
  const at::Tensor& first = caches[0];
  GLIMPSE_CHECK_VALUE(first.dim() == 4 && first.stride(3) == 1, op,
                      "caches[0] must be [num_blocks, Hkv, block_size, C] with C contiguous, got ",
                      first.sizes(), " strides ", first.strides());
  for (const at::Tensor& cache : caches) {
    GLIMPSE_CHECK_VALUE(cache.sizes() == first.sizes() && cache.strides() == first.strides() &&
                            cache.scalar_type() == first.scalar_type() && cache.device().is_cpu(),
                        op, "every cache must have the shape, strides and dtype of caches[0]");
  }
  const at::Tensor table = block_table.contiguous(), rows_index = index.contiguous();
  const int64_t num_blocks = first.size(0), heads = first.size(1), block_size = first.size(2);
  const int64_t requests = index.size(0), out_len = index.size(1), max_blocks = table.size(1);
  const int64_t elem = first.element_size();
  const size_t row_bytes = static_cast<size_t>(first.size(3) * elem);
  const int64_t stride_block = first.stride(0) * elem, stride_head = first.stride(1) * elem;
  const int64_t stride_slot = first.stride(2) * elem;
  const int32_t* blocks = table.const_data_ptr<int32_t>();
  const int64_t* idx = rows_index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows_index.numel(); ++i) {
    GLIMPSE_CHECK_VALUE(idx[i] >= -1 && idx[i] < max_blocks * block_size, op,
                        "index values must be in [-1, max_blocks * block_size) = [-1, ",
                        max_blocks * block_size, "), got ", idx[i]);
  }
  // Base pointers on this thread: data_ptr() may materialize a lazily cloned tensor.
  std::vector<char*> bases;
  for (const at::Tensor& cache : caches) bases.push_back(static_cast<char*>(cache.data_ptr()));
  auto slot = [&](int64_t p, int64_t position, int64_t& block) {
    block = blocks[p * max_blocks + position / block_size];
    return block * stride_block + (position % block_size) * stride_slot;
  };
  const int64_t tasks = static_cast<int64_t>(caches.size()) * requests * heads;
  at::parallel_for(0, tasks, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t layer = w / (requests * heads), p = (w / heads) % requests, h = w % heads;
      char* base = bases[layer] + h * stride_head;
      const int64_t* row = idx + p * out_len;
      for (int64_t i = 0; i < out_len && row[i] >= 0; ++i) {
        if (row[i] == i) continue;
        int64_t src_block = 0, dst_block = 0;
        const int64_t src = slot(p, row[i], src_block), dst = slot(p, i, dst_block);
        if (src_block < 0 || src_block >= num_blocks || dst_block < 0 || dst_block >= num_blocks) {
          continue;  // the router refuses such rows on CPU; never write outside the cache
        }
        std::memcpy(base + dst, base + src, row_bytes);
      }
    }
  });
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) { m.impl("_compact_kv_paged_native", &glimpse::compact_kv_paged_cpu); }
