// select_tokens on CPU: per row, threshold count, cap and minimum, then an nth_element
// over the candidates only when the kept set is not already fixed by the threshold.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/checks.h"
#include "cpu_kernels.h"

namespace glimpse {
namespace {

// Ranking of docs/DESIGN.md: higher score first, equal scores lower index first, NaN last.
struct RanksBefore {
  const float* score;
  bool operator()(int64_t a, int64_t b) const {
    const float sa = score[a], sb = score[b];
    const bool nan_a = std::isnan(sa), nan_b = std::isnan(sb);
    if (nan_a != nan_b) return nan_b;
    if (!nan_a && sa != sb) return sa > sb;
    return a < b;
  }
};

void select_row(const float* score, const bool* candidate, bool* keep, int64_t seq,
                std::optional<float> threshold, int64_t cap, int64_t min_keep,
                std::vector<int64_t>& candidates) {
  candidates.clear();
  int64_t n_above = 0;
  for (int64_t j = 0; j < seq; ++j) {
    keep[j] = !candidate[j];
    if (candidate[j]) {
      candidates.push_back(j);
      n_above += !threshold.has_value() || score[j] > *threshold;
    }
  }
  const int64_t n_candidates = static_cast<int64_t>(candidates.size());
  int64_t n_keep = cap > 0 ? std::min(n_above, cap) : n_above;
  n_keep = std::max(n_keep, std::min(min_keep, n_candidates));
  if (n_keep >= n_candidates) {
    for (int64_t j : candidates) keep[j] = true;
    return;
  }
  if (threshold.has_value() && n_keep == n_above) {
    // The tokens above the threshold are exactly the n_above best ones.
    for (int64_t j : candidates) keep[j] = score[j] > *threshold;
    return;
  }
  if (n_keep == 0) return;
  std::nth_element(candidates.begin(), candidates.begin() + (n_keep - 1), candidates.end(),
                   RanksBefore{score});
  for (int64_t i = 0; i < n_keep; ++i) keep[candidates[i]] = true;
}

}  // namespace

at::Tensor select_tokens_cpu(const at::Tensor& scores, const at::Tensor& candidate_mask,
                             std::optional<double> threshold, int64_t max_keep,
                             int64_t min_keep,
                             const std::optional<at::Tensor>& max_keep_per_row) {
  const char* op = "select_tokens";
  GLIMPSE_CHECK_TYPE(scores.scalar_type() == at::kFloat && scores.dim() == 2, op,
                     "scores must be fp32 [B, S], got ", scores.scalar_type(), " ",
                     scores.sizes());
  GLIMPSE_CHECK_VALUE(candidate_mask.scalar_type() == at::kBool &&
                          candidate_mask.sizes() == scores.sizes(),
                      op, "candidate_mask must be bool [B, S] like scores, got ",
                      candidate_mask.scalar_type(), " ", candidate_mask.sizes());
  GLIMPSE_CHECK_VALUE(min_keep >= 0, op, "min_keep must be >= 0, got ", min_keep);
  const int64_t batch = scores.size(0), seq = scores.size(1);
  at::Tensor caps;
  if (max_keep_per_row.has_value()) {
    caps = max_keep_per_row->contiguous();
    GLIMPSE_CHECK_VALUE(caps.scalar_type() == at::kLong && caps.dim() == 1 &&
                            caps.size(0) == batch,
                        op, "max_keep must be an int or int64 [B], got ", caps.sizes());
  }
  const at::Tensor s = scores.contiguous();
  const at::Tensor c = candidate_mask.contiguous();
  at::Tensor keep = at::empty({batch, seq}, scores.options().dtype(at::kBool));
  std::optional<float> thr;
  if (threshold.has_value()) thr = static_cast<float>(*threshold);  // compared in fp32
  const float* s_ptr = s.data_ptr<float>();
  const bool* c_ptr = c.data_ptr<bool>();
  bool* k_ptr = keep.data_ptr<bool>();
  const int64_t* cap_ptr = caps.defined() ? caps.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, batch, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> candidates;
    candidates.reserve(seq);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t cap = cap_ptr ? cap_ptr[b] : max_keep;
      select_row(s_ptr + b * seq, c_ptr + b * seq, k_ptr + b * seq, seq, thr, cap, min_keep,
                 candidates);
    }
  });
  return keep;
}

}  // namespace glimpse

TORCH_LIBRARY_IMPL(glimpse, CPU, m) {
  m.impl("_select_tokens_native", &glimpse::select_tokens_cpu);
}
