"""``glimpse.glimpse_prune``: the training-free fused path: glimpse probabilities of one
layer averaged over heads and glimpse rows, then select, index and compact every layer."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, register
from ..reference import default_scale, glimpse_prune_reference
from ._register import define_op, require_tensors, score_dtype, select_max_keep, split_max_keep
from .compact_kv import fake_compacted
from .glimpse_scores import validate as validate_scores
from .keep_index import fake_index

OP = "glimpse_prune"
SPEC = register(OpBackends(OP, native=("cpu",), triton="glimpse_prune", fp64=("reference",)))
SCHEMA = (
    "(Tensor q, Tensor[] keys, Tensor[] values, Tensor? key_mask, Tensor? candidate_mask, "
    "int score_layer, float? scale=None, float? threshold=None, int max_keep=0, "
    "int min_keep=0, int? max_len=None, str padding_side='left', "
    "Tensor? max_keep_per_row=None, str backend='auto') "
    "-> (Tensor[], Tensor[], Tensor, Tensor, Tensor)"
)


def validate(
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
    max_len,
    padding_side,
    max_keep_per_row,
    backend,
) -> None:
    v.check_kv_lists(OP, keys, values)
    if not keys:
        v.fail_value(OP, "keys must hold at least one layer, got an empty list")
    if not 0 <= score_layer < len(keys):
        v.fail_value(OP, f"score_layer must be in [0, {len(keys)}), got {score_layer}")
    validate_scores(q, keys[score_layer], key_mask, scale, "probs", backend, op=OP)
    B, S = keys[0].shape[0], keys[0].shape[2]
    v.check_mask(OP, "candidate_mask", candidate_mask, B, S)
    v.check_same_device(OP, {"q": q, "candidate_mask": candidate_mask, "max_keep": max_keep_per_row})
    v.check_select_args(OP, B, threshold, max_keep, min_keep, max_keep_per_row)
    v.check_max_len(OP, max_len)
    v.check_choice(OP, "padding_side", padding_side, v.PADDING_SIDES)


def _fake(
    q,
    keys,
    values,
    key_mask,
    candidate_mask,
    score_layer,
    scale=None,
    threshold=None,
    max_keep=0,
    min_keep=0,
    max_len=None,
    padding_side="left",
    max_keep_per_row=None,
    backend="auto",
):
    validate(
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
        max_len,
        padding_side,
        max_keep_per_row,
        backend,
    )
    B, S = keys[0].shape[0], keys[0].shape[2]
    index, lengths = fake_index(B, max_len, q.device)
    scores = q.new_empty((B, S), dtype=score_dtype(q))
    length = index.shape[1]
    return fake_compacted(keys, length), fake_compacted(values, length), index, lengths, scores


def _router(
    q,
    keys,
    values,
    key_mask,
    candidate_mask,
    score_layer,
    scale=None,
    threshold=None,
    max_keep=0,
    min_keep=0,
    max_len=None,
    padding_side="left",
    max_keep_per_row=None,
    backend="auto",
):
    validate(
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
        max_len,
        padding_side,
        max_keep_per_row,
        backend,
    )
    chosen = SPEC.resolve(backend, q.device, q.dtype, q.shape[-1])
    if chosen == "reference":
        cap = select_max_keep(max_keep, max_keep_per_row)
        return glimpse_prune_reference(
            q,
            keys,
            values,
            key_mask,
            candidate_mask,
            score_layer,
            scale,
            threshold,
            cap,
            min_keep,
            max_len,
            padding_side,
        )
    B, S = keys[0].shape[0], keys[0].shape[2]
    if key_mask is None:
        key_mask = torch.ones((B, S), dtype=torch.bool, device=q.device)
    if candidate_mask is None:
        candidate_mask = torch.ones((B, S), dtype=torch.bool, device=q.device)
    args = (
        q,
        keys,
        values,
        key_mask,
        candidate_mask,
        score_layer,
        default_scale(q.shape[-1], scale),
        threshold,
        max_keep,
        min_keep,
        max_keep_per_row,
        max_len,
        padding_side == "left",
    )
    if chosen == "native":
        return torch.ops.glimpse._glimpse_prune_native(*args)
    return SPEC.triton_module().glimpse_prune_triton(*args)


define_op(OP, SCHEMA, _router, _fake)


def glimpse_prune(
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
    backend: str = "auto",
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor, Tensor]:
    """Training-free GlimpsePrune in one op: score, select, index and compact.

    Args:
        q: [B, H, G, D] glimpse query rows at layer ``score_layer`` (after RoPE).
        keys, values: lists of [B, Hkv, S, D] caches of the layers to compact, q's dtype.
        key_mask: bool [B, S], False for padding; None: all valid. Padding is never kept.
        candidate_mask: bool [B, S], the prunable (visual) tokens; None: every valid token.
            Valid non-candidates (text) are always kept.
        score_layer: which entry of ``keys`` the glimpse rows attend over.
        scale: logit scale, default ``1 / sqrt(D)``.
        threshold, max_keep, min_keep: as in ``select_tokens``, applied to the scores.
        max_len, padding_side: as in ``keep_index`` (no host sync when max_len is given).
        backend: ``auto | reference | native | triton``.

    Returns:
        (keys, values, index, lengths, scores): compacted [B, Hkv, Lmax, D] lists with zero
        pads, index int64 [B, Lmax] (-1 pads), lengths int64 [B], and scores fp32 [B, S] =
        glimpse probabilities averaged over the H heads and G rows (0 at padding).
    """
    require_tensors(OP, q=q, keys=keys, values=values)
    cap, cap_per_row = split_max_keep(OP, max_keep)
    return torch.ops.glimpse.glimpse_prune(
        q,
        keys,
        values,
        key_mask,
        candidate_mask,
        score_layer,
        scale,
        threshold,
        cap,
        min_keep,
        max_len,
        padding_side,
        cap_per_row,
        backend,
    )
