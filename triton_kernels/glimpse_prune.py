"""Triton glimpse_prune: glimpse probabilities of the scoring layer (two launches), their
mean over heads and glimpse rows, then select, index and compact (three launches). No host
sync when max_len is given."""

from __future__ import annotations

from .compact_kv import compact_kv_triton
from .glimpse_scores import PROBS, glimpse_scores_triton
from .keep_index import keep_index_triton
from .select_tokens import select_tokens_triton


def glimpse_prune_triton(
    q,
    keys,
    values,
    key_mask,
    candidate_mask,
    score_layer,
    scale,
    threshold,
    max_keep,
    min_keep,
    max_keep_per_row,
    max_len,
    left_padding,
):
    scores = glimpse_scores_triton(q, keys[score_layer], key_mask, scale, PROBS).mean(dim=(1, 2))
    keep = select_tokens_triton(scores, candidate_mask & key_mask, threshold, max_keep, min_keep, max_keep_per_row)
    keep &= key_mask  # padding is never kept
    index, lengths = keep_index_triton(keep, max_len, left_padding)
    new_keys, new_values = compact_kv_triton(keys, values, index)
    return new_keys, new_values, index, lengths, scores
