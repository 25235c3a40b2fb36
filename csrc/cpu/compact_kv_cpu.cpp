// compact_kv on CPU: every layer's K and V in one parallel loop over (tensor, b, head);
// each kept token is one row copy of D elements, pad slots are zeroed. compact_kv_into runs
// the same loop into the caller's tensors (a preallocated cache): no allocation, no copy.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GLIMPSE_COMPACT_STREAM 1
#endif

#include "../common/checks.h"
#include "cpu_kernels.h"

namespace glimpse {

namespace {

constexpr int64_t kPrefetchRows = 8;

#ifdef GLIMPSE_COMPACT_STREAM
bool can_stream() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// One row with non-temporal stores: the compacted cache is read again layers or a decode
// step later, so writing around the cache saves the read-for-ownership of every output
// line (measured here: 5-15% of the whole gather). row_bytes % 64 == 0, dst 32-byte aligned;
// src == nullptr writes zeros.
__attribute__((target("avx2"))) void stream_row(char* dst, const char* src, size_t row_bytes) {
  for (size_t i = 0; i < row_bytes; i += 64) {
    const __m256i a = src ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))
                          : _mm256_setzero_si256();
    const __m256i b = src ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32))
                          : _mm256_setzero_si256();
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
  }
}

__attribute__((target("avx2"))) void store_fence() { _mm_sfence(); }
#else
bool can_stream() { return false; }
void stream_row(char*, const char*, size_t) {}  // never called: can_stream() is false
void store_fence() {}
#endif

// The checked call: keys then values (head dim contiguous), the index and its geometry.
struct CompactCall {
  std::vector<at::Tensor> sources;
  at::Tensor index;  // contiguous int64 [B, Lmax], values in [-1, S)
  int64_t batch = 0, heads = 0, seq = 0, out_len = 0;
};

CompactCall check_call(const char* op, at::TensorList keys, at::TensorList values,
                       const at::Tensor& index) {
  GLIMPSE_CHECK_VALUE(keys.size() == values.size(), op,
                      "keys and values must have the same length, got ", keys.size(), " and ",
                      values.size());
  GLIMPSE_CHECK_TYPE(index.scalar_type() == at::kLong && index.dim() == 2, op,
                     "index must be int64 [B, Lmax], got ", index.scalar_type(), " ",
                     index.sizes());
  CompactCall call;
  call.index = index.contiguous();
  call.out_len = index.size(1);
  if (keys.empty()) return call;
  const at::Tensor& first = keys[0];
  GLIMPSE_CHECK_VALUE(first.dim() == 4 && index.size(0) == first.size(0), op,
                      "keys[0] must be [B, Hkv, S, D] with B = index.size(0), got ",
                      first.sizes());
  call.batch = first.size(0);
  call.heads = first.size(1);
  call.seq = first.size(2);
  const int64_t* idx = call.index.data_ptr<int64_t>();
  for (int64_t i = 0; i < call.index.numel(); ++i) {
    GLIMPSE_CHECK_VALUE(idx[i] >= -1 && idx[i] < call.seq, op,
                        "index values must be in [-1, S) = [-1, ", call.seq, "), got ", idx[i]);
  }
  // Sources keep their strides over (B, Hkv, S); only the head dim must be contiguous.
  const int64_t n_layers = static_cast<int64_t>(keys.size());
  for (int64_t t = 0; t < 2 * n_layers; ++t) {
    const at::Tensor& src = t < n_layers ? keys[t] : values[t - n_layers];
    GLIMPSE_CHECK_VALUE(src.dim() == 4 && src.size(0) == call.batch && src.size(1) == call.heads &&
                            src.size(2) == call.seq && src.scalar_type() == first.scalar_type(),
                        op, "every key and value must be [B, Hkv, S, D] like keys[0] ",
                        first.sizes(), ", got ", src.sizes());
    call.sources.push_back(src.stride(3) == 1 ? src : src.contiguous());
  }
  return call;
}

// outputs[t] (contiguous [B, Hkv, Lmax, D_t]) = sources[t] gathered along S by the index.
void gather_rows(const CompactCall& call, const std::vector<at::Tensor>& outputs) {
  const int64_t batch = call.batch, heads = call.heads, out_len = call.out_len;
  const int64_t* idx_ptr = call.index.const_data_ptr<int64_t>();
  const int64_t tasks = static_cast<int64_t>(call.sources.size()) * batch * heads;
  // Base pointers once, on this thread: data_ptr() of a caller's lazily cloned (copy on
  // write) tensor materializes it, which must not happen from several threads at once.
  std::vector<const char*> src_ptrs;
  std::vector<char*> dst_ptrs;
  for (size_t t = 0; t < call.sources.size(); ++t) {
    src_ptrs.push_back(static_cast<const char*>(call.sources[t].const_data_ptr()));
    dst_ptrs.push_back(static_cast<char*>(outputs[t].data_ptr()));
  }
  at::parallel_for(0, tasks, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / (batch * heads), b = (w / heads) % batch, h = w % heads;
      const at::Tensor& src = call.sources[t];
      const int64_t elem = src.element_size();
      const size_t row_bytes = static_cast<size_t>(src.size(3) * elem);
      const char* base = src_ptrs[t] + (b * src.stride(0) + h * src.stride(1)) * elem;
      const int64_t seq_stride = src.stride(2) * elem;
      char* dst = dst_ptrs[t] + ((b * heads + h) * out_len) * row_bytes;
      const int64_t* row_idx = idx_ptr + b * out_len;
      const bool stream = can_stream() && row_bytes % 64 == 0 &&
                          reinterpret_cast<std::uintptr_t>(dst) % 32 == 0;
      for (int64_t i = 0; i < out_len; ++i) {
        // Kept rows are scattered: prefetch a few rows ahead to hide memory latency.
        if (i + kPrefetchRows < out_len && row_idx[i + kPrefetchRows] >= 0) {
          const char* ahead = base + row_idx[i + kPrefetchRows] * seq_stride;
          for (size_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(ahead + line);
        }
        const char* row = row_idx[i] < 0 ? nullptr : base + row_idx[i] * seq_stride;
        if (stream) {
          stream_row(dst + i * row_bytes, row, row_bytes);
        } else if (row == nullptr) {
          std::memset(dst + i * row_bytes, 0, row_bytes);
        } else {
          std::memcpy(dst + i * row_bytes, row, row_bytes);
        }
      }
    }
    // Streaming stores are weakly ordered: make them visible before the threads join.
    if (can_stream()) store_fence();
  });
}

// Whether two tensors may share bytes: the same storage and intersecting byte extents
// (conservative for interleaved strided views, exact for contiguous ones).
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) return false;
  auto extent = [](const at::Tensor& t) {
    const char* first = static_cast<const char*>(t.const_data_ptr());
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return std::make_pair(first, first + (last + 1) * t.element_size());
  };
  const auto [a_begin, a_end] = extent(a);
  const auto [b_begin, b_end] = extent(b);
  return a_begin < b_end && b_begin < a_end;
}

std::string output_name(int64_t t, int64_t n_layers) {
  return (t < n_layers ? "out_keys[" : "out_values[") + std::to_string(t % n_layers) + "]";
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> compact_kv_cpu(
    at::TensorList keys, at::TensorList values, const at::Tensor& index) {
  const CompactCall call = check_call("compact_kv", keys, values, index);
  std::vector<at::Tensor> outputs;
  for (const at::Tensor& src : call.sources) {
    outputs.push_back(at::empty({call.batch, call.heads, call.out_len, src.size(3)}, src.options()));
  }
  gather_rows(call, outputs);
  const auto n_layers = static_cast<std::ptrdiff_t>(keys.size());
  return {std::vector<at::Tensor>(outputs.begin(), outputs.begin() + n_layers),
          std::vector<at::Tensor>(outputs.begin() + n_layers, outputs.end())};
}

void compact_kv_into_cpu(at::TensorList keys, at::TensorList values, const at::Tensor& index,
                         at::TensorList out_keys, at::TensorList out_values) {
  const char* op = "compact_kv_into";
  const CompactCall call = check_call(op, keys, values, index);
  GLIMPSE_CHECK_VALUE(out_keys.size() == keys.size() && out_values.size() == values.size(), op,
                      "out_keys and out_values must hold one tensor per layer (", keys.size(),
                      "), got ", out_keys.size(), " and ", out_values.size());
  std::vector<at::Tensor> outputs;
  const int64_t n_layers = static_cast<int64_t>(keys.size());
  for (int64_t t = 0; t < 2 * n_layers; ++t) {
    const at::Tensor& out = t < n_layers ? out_keys[t] : out_values[t - n_layers];
    const at::Tensor& src = call.sources[t];
    GLIMPSE_CHECK_TYPE(out.scalar_type() == src.scalar_type(), op, output_name(t, n_layers),
                       " must have the inputs' dtype ", src.scalar_type(), ", got ",
                       out.scalar_type());
    GLIMPSE_CHECK_VALUE(out.dim() == 4 && out.size(0) == call.batch && out.size(1) == call.heads &&
                            out.size(2) == call.out_len && out.size(3) == src.size(3) &&
                            out.is_contiguous() && out.device().is_cpu(),
                        op, output_name(t, n_layers), " must be a contiguous CPU tensor [",
                        call.batch, ", ", call.heads, ", ", call.out_len, ", ", src.size(3),
                        "], got ", out.sizes(), " on ", out.device(),
                        out.is_contiguous() ? "" : ", not contiguous");
    outputs.push_back(out);
  }
  // The rows are written in place while others are still to be read, by several threads.
  for (int64_t t = 0; t < 2 * n_layers; ++t) {
    for (int64_t u = 0; u < 2 * n_layers; ++u) {
      GLIMPSE_CHECK_VALUE(!may_overlap(outputs[t], call.sources[u]), op, output_name(t, n_layers),
                          " overlaps the input ", u < n_layers ? "keys[" : "values[",
                          u % n_layers, "]: outputs must not share memory with the inputs");
      GLIMPSE_CHECK_VALUE(u <= t || !may_overlap(outputs[t], outputs[u]), op,
                          output_name(t, n_layers), " and ", output_name(u, n_layers),
                          " share memory: every output needs its own");
    }
  }
  gather_rows(call, outputs);
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_compact_kv_native", &glimpse::compact_kv_cpu);
  m.impl("_compact_kv_into_native", &glimpse::compact_kv_into_cpu);
}
