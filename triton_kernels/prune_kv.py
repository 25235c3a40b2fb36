"""Triton prune_kv: select_tokens, keep_index and compact_kv kernels back to back: three
launches, no host sync when max_len is given (so the sequence can be graph-captured)."""

from __future__ import annotations

from .compact_kv import compact_kv_triton
from .keep_index import keep_index_triton
from .select_tokens import select_tokens_triton


def prune_kv_triton(
    scores, candidate_mask, keys, values, threshold, max_keep, min_keep, max_keep_per_row, max_len, left_padding
):
    keep = select_tokens_triton(scores, candidate_mask, threshold, max_keep, min_keep, max_keep_per_row)
    index, lengths = keep_index_triton(keep, max_len, left_padding)
    new_keys, new_values = compact_kv_triton(keys, values, index)
    return new_keys, new_values, index, lengths, keep
