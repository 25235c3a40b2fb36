// Shared helpers for the native kernels. The Python routers validate every input with
// the same wording; these checks guard direct calls of the private `_..._native` ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define GLIMPSE_CHECK_VALUE(cond, op, ...) \
  TORCH_CHECK_VALUE(cond, "glimpse.", op, ": ", __VA_ARGS__)
#define GLIMPSE_CHECK_TYPE(cond, op, ...) \
  TORCH_CHECK_TYPE(cond, "glimpse.", op, ": ", __VA_ARGS__)

namespace glimpse {

// Grain sizes for at::parallel_for: small per-item work wants many items per task.
constexpr int64_t kRowGrain = 1;
constexpr int64_t kCopyGrain = 16;

}  // namespace glimpse
