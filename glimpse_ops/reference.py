"""Plain-PyTorch reference implementations: the executable spec of every ``glimpse`` op.

Each function computes in fp32 (scores, softmax, accumulations) and favours clarity over
speed. Kernels are tested against these functions; never change one to match a kernel.
fp64 inputs are computed in fp64 (for gradient checks). Inputs are assumed to be validated
already (the op routers do that); these functions check no shapes or dtypes. One value rule
is part of the spec and raises here too: ``keep_index_reference`` refuses a row longer than
``max_len`` (ValueError), as every backend reports it.

Notation: B batch, S sequence positions, H query heads, Hkv KV heads (head h reads KV head
``h // (H // Hkv)``), G glimpse query rows, D head dim, Lmax compacted length.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import check_kept_lengths

__all__ = [
    "glimpse_scores_reference",
    "glimpse_scores_backward_reference",
    "attention_column_scores_reference",
    "select_tokens_reference",
    "keep_index_reference",
    "gather_tokens_reference",
    "compact_kv_reference",
    "prune_kv_reference",
    "glimpse_prune_reference",
    "soft_mask_attention_reference",
    "soft_mask_attention_forward_reference",
    "soft_mask_attention_backward_reference",
]

NORMALIZE_MODES = ("logits", "probs", "log_probs")


def default_scale(head_dim: int, scale: float | None) -> float:
    """The softmax scale: ``scale`` if given, else ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _acc(t: Tensor) -> Tensor:
    """The accumulation dtype: fp32, or fp64 for fp64 inputs (used by gradient checks)."""
    return t.double() if t.dtype == torch.float64 else t.float()


def _repeat_kv(k: Tensor, num_heads: int) -> Tensor:
    """[B, Hkv, S, D] -> [B, H, S, D] in the accumulation dtype (head h reads KV head
    h // (H / Hkv))."""
    return _acc(k).repeat_interleave(num_heads // k.shape[1], dim=1)


def _all_true(batch: int, seq: int, device: torch.device) -> Tensor:
    return torch.ones(batch, seq, dtype=torch.bool, device=device)


# ---------------------------------------------------------------------------------------
# glimpse_scores
# ---------------------------------------------------------------------------------------


def glimpse_scores_reference(
    q: Tensor,
    k: Tensor,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    normalize: str = "probs",
) -> Tensor:
    """Scores of G glimpse query rows against every key.

    q [B, H, G, D], k [B, Hkv, S, D] (fp32/fp16/bf16), key_mask bool [B, S] or None (all
    valid). Returns fp32 [B, H, G, S]: ``s = scale * q.k``; ``logits`` gives s with -inf at
    invalid keys; ``probs`` the softmax over valid keys (0 at invalid keys, and 0 for a row
    with no valid key); ``log_probs`` the log-softmax (-inf at invalid keys).
    """
    B, H, G, D = q.shape
    S = k.shape[2]
    scale = default_scale(D, scale)
    valid = _all_true(B, S, q.device) if key_mask is None else key_mask
    valid = valid[:, None, None, :]
    logits = scale * torch.einsum("bhgd,bhsd->bhgs", _acc(q), _repeat_kv(k, H))
    logits = logits.masked_fill(~valid, float("-inf"))
    if normalize == "logits":
        return logits
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # -inf for a row with no valid key
    lse = torch.where(torch.isfinite(lse), lse, 0.0)  # keeps autograd free of -inf - -inf
    if normalize == "log_probs":
        return torch.where(valid, logits - lse, float("-inf"))
    return torch.where(valid, torch.exp(logits - lse), 0.0)


def glimpse_scores_backward_reference(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    key_mask: Tensor | None,
    scale: float | None,
    normalize: str,
    out: Tensor,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``glimpse_scores`` w.r.t. q and k, from the saved output.

    grad_out and out fp32 [B, H, G, S]. Returns (dq like q, dk like k). Invalid keys get no
    gradient; ``probs`` uses p = out, ``log_probs`` p = exp(out).
    """
    B, H, G, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = default_scale(D, scale)
    valid = _all_true(B, S, q.device) if key_mask is None else key_mask
    valid = valid[:, None, None, :]
    g = torch.where(valid, _acc(grad_out), 0.0)
    if normalize == "logits":
        ds = g
    elif normalize == "probs":
        p = _acc(out)
        ds = p * (g - (g * p).sum(-1, keepdim=True))
    else:
        p = torch.where(valid, torch.exp(_acc(out)), 0.0)
        ds = g - p * g.sum(-1, keepdim=True)
    dq = scale * torch.einsum("bhgs,bhsd->bhgd", ds, _repeat_kv(k, H))
    dk_per_head = scale * torch.einsum("bhgs,bhgd->bhsd", ds, _acc(q))
    dk = dk_per_head.view(B, Hkv, H // Hkv, S, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype)


# ---------------------------------------------------------------------------------------
# attention_column_scores
# ---------------------------------------------------------------------------------------


def _allowed_keys(
    key_mask: Tensor | None, causal: bool, batch: int, n_q: int, n_k: int, device: torch.device
) -> Tensor:
    """bool [B, 1, Nq, Nk]: key j is visible from query row i."""
    allowed = torch.ones(batch, 1, n_q, n_k, dtype=torch.bool, device=device)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    if causal:
        rows = torch.arange(n_q, device=device)[:, None]
        cols = torch.arange(n_k, device=device)[None, :]
        allowed = allowed & (cols <= rows)
    return allowed


def attention_column_scores_reference(
    q: Tensor,
    k: Tensor,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    """Column sums of the attention probabilities over the selected query rows.

    q [B, H, S, D], k [B, Hkv, S, D], query_mask / key_mask bool [B, S] or None (all).
    Returns fp32 [B, H, S]: ``out[b, h, j] = sum_{i: query_mask[b, i]} P[b, h, i, j]`` where
    P is the softmax of ``scale * q.k`` over the keys row i may see (key_mask, and j <= i
    when causal). A row that sees no key contributes nothing.
    """
    B, H, S, D = q.shape
    scale = default_scale(D, scale)
    allowed = _allowed_keys(key_mask, causal, B, S, S, q.device)
    logits = scale * torch.einsum("bhid,bhjd->bhij", _acc(q), _repeat_kv(k, H))
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0))
    if query_mask is not None:
        probs = probs * query_mask[:, None, :, None]
    return probs.sum(dim=2)


# ---------------------------------------------------------------------------------------
# select_tokens and keep_index
# ---------------------------------------------------------------------------------------


def _candidate_ranks(scores: Tensor, candidate_mask: Tensor) -> Tensor:
    """int64 [B, S]: each candidate's rank (0 = best) among the candidates of its row.

    Higher score first, equal scores lower index first, NaN after every number.
    Non-candidates rank after all candidates.
    """
    B, S = scores.shape
    is_nan = torch.isnan(scores)
    # + 0.0 turns -0.0 into +0.0, so the two zeros tie as they do under `>`.
    value = torch.where(is_nan | ~candidate_mask, 0.0, scores) + 0.0
    group = torch.where(candidate_mask, is_nan.long(), 2)
    by_value = torch.sort(value, dim=1, descending=True, stable=True).indices
    by_group = torch.sort(group.gather(1, by_value), dim=1, stable=True).indices
    order = by_value.gather(1, by_group)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(S, device=scores.device).expand(B, S))
    return ranks


def select_tokens_reference(
    scores: Tensor,
    candidate_mask: Tensor | None = None,
    threshold: float | None = None,
    max_keep: int | Tensor = 0,
    min_keep: int = 0,
) -> Tensor:
    """Keep mask from scores: threshold, then a top-k cap, then a minimum count.

    scores fp32 [B, S]; candidate_mask bool [B, S] or None (all candidates); max_keep int or
    int64 [B] (<= 0: no cap); min_keep int. Returns bool [B, S].

    Non-candidates are kept. Among candidates: keep ``score > threshold`` (threshold None:
    all); if more than max_keep remain, keep the best max_keep; if fewer than
    ``min(min_keep, n_candidates)`` remain, keep the best that many. Ranking: higher score
    first, equal scores lower index first, NaN lowest. The threshold is compared in fp32.
    """
    B, S = scores.shape
    scores = scores.float()
    cand = _all_true(B, S, scores.device) if candidate_mask is None else candidate_mask
    n_cand = cand.sum(dim=1)
    if threshold is None:
        n_keep = n_cand.clone()
    else:
        threshold_fp32 = torch.tensor(threshold, dtype=torch.float32, device=scores.device)
        n_keep = (cand & (scores > threshold_fp32)).sum(dim=1)
    cap = torch.as_tensor(max_keep, dtype=torch.int64, device=scores.device).expand(B)
    n_keep = torch.where(cap > 0, torch.minimum(n_keep, cap), n_keep)
    n_keep = torch.maximum(n_keep, torch.clamp(n_cand, max=min_keep))
    ranks = _candidate_ranks(scores, cand)
    return ~cand | (ranks < n_keep[:, None])


def keep_index_reference(keep: Tensor, max_len: int | None = None, padding_side: str = "left") -> tuple[Tensor, Tensor]:
    """Order-preserving positions of the kept tokens of each row.

    keep bool [B, S]. Returns (index int64 [B, Lmax], lengths int64 [B]). Lmax is max_len if
    given, else max(lengths). Pad slots hold -1 and sit at the start of the row for
    ``padding_side='left'``, at the end for ``'right'``. Raises ValueError if a row keeps
    more than max_len tokens.
    """
    B, S = keep.shape
    lengths = keep.sum(dim=1)
    if max_len is None:
        max_len = int(lengths.max())
    check_kept_lengths(lengths, max_len)
    slot = keep.long().cumsum(dim=1) - 1
    if padding_side == "left":
        slot = slot + (max_len - lengths)[:, None]
    # Dropped tokens write into a spare column max_len that is cut off afterwards.
    slot = torch.where(keep, slot, max_len)
    index = torch.full((B, max_len + 1), -1, dtype=torch.int64, device=keep.device)
    index.scatter_(1, slot, torch.arange(S, device=keep.device).expand(B, S))
    return index[:, :max_len].contiguous(), lengths


# ---------------------------------------------------------------------------------------
# gather_tokens, compact_kv, prune_kv
# ---------------------------------------------------------------------------------------


def gather_tokens_reference(x: Tensor, index: Tensor, pad_value: float | int | bool = 0) -> Tensor:
    """``out[b, t] = x[b, index[b, t]]``, and pad_value where ``index[b, t] == -1``.

    x [B, S, ...] any dtype; index int64 [B, Lmax] with values in [-1, S).
    Returns [B, Lmax, ...] with x's dtype.
    """
    B, L = index.shape
    rows = torch.arange(B, device=x.device)[:, None]
    out = x[rows, index.clamp(min=0)]
    pad = (index < 0).view(B, L, *([1] * (x.dim() - 2)))
    return out.masked_fill(pad, pad_value)


def compact_kv_reference(keys: list[Tensor], values: list[Tensor], index: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Gather every layer's K and V along S: [B, Hkv, S, D] -> [B, Hkv, Lmax, D], pads zero."""

    def compact(t: Tensor) -> Tensor:
        return gather_tokens_reference(t.transpose(1, 2), index, 0).transpose(1, 2).contiguous()

    return [compact(t) for t in keys], [compact(t) for t in values]


def compact_kv_paged_reference(caches: list[Tensor], block_table: Tensor, index: Tensor) -> None:
    """In place, every layer's paged cache [num_blocks, Hkv, block_size, C]: request p's
    logical row i (block ``block_table[p, i // block_size]``, offset ``i % block_size``) gets
    its row ``index[p, i]`` for each i with ``index[p, i] >= 0``; other rows are untouched.
    Gather first, then scatter (so the order of the moves cannot matter)."""
    if not caches or index.numel() == 0:
        return
    block_size = caches[0].shape[2]
    p, i = (index >= 0).nonzero(as_tuple=True)
    source = index[p, i]
    src_block, src_offset = block_table[p, source // block_size].long(), source % block_size
    dst_block, dst_offset = block_table[p, i // block_size].long(), i % block_size
    for cache in caches:
        rows = cache[src_block, :, src_offset, :].clone()  # [N, Hkv, C]
        cache[dst_block, :, dst_offset, :] = rows


def prune_kv_reference(
    scores: Tensor,
    candidate_mask: Tensor | None,
    keys: list[Tensor],
    values: list[Tensor],
    threshold: float | None = None,
    max_keep: int | Tensor = 0,
    min_keep: int = 0,
    max_len: int | None = None,
    padding_side: str = "left",
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor, Tensor]:
    """select_tokens + keep_index + compact_kv. Returns (keys, values, index, lengths, keep)."""
    keep = select_tokens_reference(scores, candidate_mask, threshold, max_keep, min_keep)
    index, lengths = keep_index_reference(keep, max_len, padding_side)
    new_keys, new_values = compact_kv_reference(keys, values, index)
    return new_keys, new_values, index, lengths, keep


def glimpse_prune_reference(
    q: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    key_mask: Tensor | None,
    candidate_mask: Tensor | None,
    score_layer: int,
    scale: float | None = None,
    threshold: float | None = None,
    max_keep: int | Tensor = 0,
    min_keep: int = 0,
    max_len: int | None = None,
    padding_side: str = "left",
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor, Tensor]:
    """Training-free GlimpsePrune: score with the glimpse rows, select, index and compact.

    scores [B, S] = glimpse probabilities of ``keys[score_layer]`` averaged over the H heads
    and G glimpse rows (0 at invalid keys). Candidates are ``candidate_mask & key_mask``;
    invalid keys (key_mask False, i.e. padding) are never kept; other non-candidates are.
    Returns (keys, values, index, lengths, scores).
    """
    probs = glimpse_scores_reference(q, keys[score_layer], key_mask, scale, "probs")
    scores = probs.mean(dim=(1, 2))
    B, S = scores.shape
    valid = _all_true(B, S, q.device) if key_mask is None else key_mask
    cand = valid if candidate_mask is None else candidate_mask & valid
    keep = select_tokens_reference(scores, cand, threshold, max_keep, min_keep) & valid
    index, lengths = keep_index_reference(keep, max_len, padding_side)
    new_keys, new_values = compact_kv_reference(keys, values, index)
    return new_keys, new_values, index, lengths, scores


# ---------------------------------------------------------------------------------------
# soft_mask_attention
# ---------------------------------------------------------------------------------------


def _soft_mask_terms(
    q: Tensor,
    k: Tensor,
    key_weight: Tensor,
    key_mask: Tensor | None,
    causal: bool,
    scale: float | None,
) -> tuple[Tensor, Tensor, float, Tensor]:
    """(E, w, scale, L): E_ij = exp(s_ij - L_i), L_i = log sum_l w_l exp(s_il) over allowed l.

    E is fp32 [B, H, N, N], 0 where j is not allowed and on rows whose weights sum to 0;
    w is key_weight as fp32 [B, 1, 1, N]; L is fp32 [B, H, N], +inf on such rows. Written
    so that autograd never meets inf - inf, 0 * inf or a division by w.
    """
    B, H, N, D = q.shape
    scale = default_scale(D, scale)
    allowed = _allowed_keys(key_mask, causal, B, N, N, q.device)
    logits = scale * torch.einsum("bhid,bhjd->bhij", _acc(q), _repeat_kv(k, H))
    logits = logits.masked_fill(~allowed, float("-inf"))
    w = _acc(key_weight)[:, None, None, :]
    # The shift is the max over keys that carry weight: a dominant key with w = 0 must not set
    # it (the others' exp(s - max) would underflow). Exponents are capped at the dtype's exp
    # range, which only ever binds on such a key: its w exp(.) is then 0, not 0 * inf, and only
    # its own dw saturates.
    cap = math.log(torch.finfo(logits.dtype).max) - 1.0
    row_max = logits.masked_fill(w == 0, float("-inf")).amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0).detach()
    total = (w * torch.exp((logits - row_max).clamp_max(cap))).sum(dim=-1, keepdim=True)
    live = total > 0
    lse = row_max + torch.log(torch.where(live, total, 1.0))
    unweighted = torch.where(live, torch.exp((logits - lse).clamp_max(cap)), 0.0)
    return unweighted, w, scale, torch.where(live, lse, float("inf")).squeeze(-1)


def soft_mask_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_weight: Tensor,
    key_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    """Attention with a soft per-key weight.

    q [B, H, N, D], k and v [B, Hkv, N, D], key_weight [B, N] in [0, 1], key_mask bool
    [B, N] or None. ``P[i, j] = w_j exp(s_ij) / sum_l w_l exp(s_il)`` over allowed l (key_mask
    and, when causal, l <= i); a row whose allowed weights sum to 0 outputs 0. Returns
    [B, H, N, D] in q's dtype. Differentiable in q, k, v and key_weight by autograd (the
    weight gradient is finite at w = 0: no division by w).
    """
    return soft_mask_attention_forward_reference(q, k, v, key_weight, key_mask, causal, scale)[0]


def soft_mask_attention_forward_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_weight: Tensor,
    key_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out like q, L fp32 [B, H, N]): the output and the per-row log of the weighted
    softmax denominator (+inf for a row whose allowed weights sum to 0), which the fused
    kernels save for the backward."""
    unweighted, w, _, lse = _soft_mask_terms(q, k, key_weight, key_mask, causal, scale)
    out = torch.einsum("bhij,bhjd->bhid", w * unweighted, _repeat_kv(v, q.shape[1]))
    return out.to(q.dtype), lse


def soft_mask_attention_backward_reference(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_weight: Tensor,
    key_mask: Tensor | None,
    causal: bool,
    scale: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Explicit gradients of ``soft_mask_attention`` (the formulas the fused kernel uses).

    With L_i = log sum_l w_l exp(s_il), E_ij = exp(s_ij - L_i) (0 for a zero row),
    P_ij = w_j E_ij, dP = dO V^T and delta_i = sum_j P_ij dP_ij:
    ``G_ij = E_ij (dP_ij - delta_i)``, ``dS = w_j G_ij = P_ij (dP_ij - delta_i)``, ``dw_j = sum_{h, i} G_ij``,
    ``dq = scale dS K``, ``dk = scale dS^T Q``, ``dv = P^T dO``. Returns (dq, dk, dv, dw).
    """
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    unweighted, w, scale, _ = _soft_mask_terms(q, k, key_weight, key_mask, causal, scale)
    probs = w * unweighted
    do = _acc(grad_out)
    d_probs = torch.einsum("bhid,bhjd->bhij", do, _repeat_kv(v, H))
    delta = (probs * d_probs).sum(-1, keepdim=True)
    g = unweighted * (d_probs - delta)
    ds = probs * (d_probs - delta)  # = w g, without 0 * inf where E saturated
    dq = scale * torch.einsum("bhij,bhjd->bhid", ds, _repeat_kv(k, H))
    group = (B, Hkv, H // Hkv, N, D)
    dk = (scale * torch.einsum("bhij,bhid->bhjd", ds, _acc(q))).view(group).sum(2)
    dv = torch.einsum("bhij,bhid->bhjd", probs, do).view(group).sum(2)
    dw = g.sum(dim=(1, 2))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dw.to(key_weight.dtype)
