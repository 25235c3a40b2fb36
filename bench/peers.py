"""The eager peer pipelines, written the way public pruning code does it.

GlimpsePrune (`_cal_attn_weights`, `_reduce_tokens`), FastV and kvpress: ``repeat_kv`` +
matmul in the model dtype + fp32 softmax + mean for scores; ``torch.topk`` / thresholds on
the host-visible mask; per-sample boolean indexing with ``.tolist()`` host syncs; per-layer,
per-sample ``index_select`` and a zero re-pad. Kept here only as the baseline to beat.
"""

from __future__ import annotations

import torch
from torch import Tensor


def repeat_kv(k: Tensor, n_rep: int) -> Tensor:
    """HF's repeat_kv: materializes [B, H, S, D]."""
    B, Hkv, S, D = k.shape
    return k[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


def eager_glimpse_scores(q: Tensor, k: Tensor, key_mask: Tensor, scale: float) -> Tensor:
    """probs fp32 [B, H, G, S] (GlimpsePrune / FastV / SnapKV style)."""
    logits = torch.matmul(q, repeat_kv(k, q.shape[1] // k.shape[1]).transpose(2, 3)) * scale
    logits = logits.masked_fill(~key_mask[:, None, None, :], torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def eager_select(scores: Tensor, candidate_mask: Tensor, max_keep: int) -> Tensor:
    """Top max_keep candidates by torch.topk + sort; non-candidates kept. keep bool [B, S]."""
    masked = scores.masked_fill(~candidate_mask, float("-inf"))
    top = torch.topk(masked, max_keep, dim=1, sorted=True).indices
    top = torch.sort(top, dim=1).values
    keep = ~candidate_mask
    return keep.scatter(1, top, True)


def eager_compact(keys: list[Tensor], values: list[Tensor], keep: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Boolean indexing with host syncs, per-layer per-sample index_select, left re-pad."""
    lengths = keep.sum(dim=1).tolist()  # host sync
    longest = max(lengths)
    positions = [keep[b].nonzero().squeeze(1) for b in range(keep.shape[0])]  # syncs

    def compact(t: Tensor) -> Tensor:
        out = t.new_zeros(t.shape[0], t.shape[1], longest, t.shape[3])
        for b, pos in enumerate(positions):
            out[b, :, longest - len(pos) :] = t[b].index_select(1, pos)
        return out

    index = torch.full((keep.shape[0], longest), -1, dtype=torch.int64, device=keep.device)
    for b, pos in enumerate(positions):
        index[b, longest - len(pos) :] = pos
    return [compact(t) for t in keys], [compact(t) for t in values], index


def eager_keep_index(keep: Tensor) -> Tensor:
    """Positions of kept tokens via per-row nonzero (host syncs), left-padded with -1."""
    return eager_compact([], [], keep)[2]


def eager_compact_by_index(
    keys: list[Tensor], values: list[Tensor], index: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """kvpress-style per-layer gather of an index (pads -1 zeroed): 2 ops per tensor."""
    B, L = index.shape
    pad = (index < 0)[:, None, :, None]
    safe = index.clamp(min=0)

    def compact(t: Tensor) -> Tensor:
        gathered = t.gather(2, safe[:, None, :, None].expand(B, t.shape[1], L, t.shape[3]))
        return gathered.masked_fill(pad, 0)

    return [compact(t) for t in keys], [compact(t) for t in values]


def eager_prune_kv(scores, candidate_mask, keys, values, max_keep):
    keep = eager_select(scores, candidate_mask, max_keep)
    new_k, new_v, index = eager_compact(keys, values, keep)
    return new_k, new_v, index, keep


def eager_glimpse_prune(q, keys, values, key_mask, candidate_mask, score_layer, scale, max_keep):
    probs = eager_glimpse_scores(q, keys[score_layer], key_mask, scale)
    scores = probs.mean(dim=(1, 2))
    keep = eager_select(scores, candidate_mask & key_mask, max_keep) & key_mask
    new_k, new_v, index = eager_compact(keys, values, keep)
    return new_k, new_v, index, scores
