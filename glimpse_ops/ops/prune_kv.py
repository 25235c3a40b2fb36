"""``glimpse.prune_kv``: select_tokens + keep_index + compact_kv as one op (the VIP path)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, register
from ..reference import prune_kv_reference
from ._register import define_op, require_tensors, select_max_keep, split_max_keep
from .compact_kv import fake_compacted
from .keep_index import fake_index
from .select_tokens import validate as validate_select

OP = "prune_kv"
SPEC = register(OpBackends(OP, native=("cpu",), triton="prune_kv"))
SCHEMA = (
    "(Tensor scores, Tensor? candidate_mask, Tensor[] keys, Tensor[] values, "
    "float? threshold=None, int max_keep=0, int min_keep=0, int? max_len=None, "
    "str padding_side='left', Tensor? max_keep_per_row=None, str backend='auto') "
    "-> (Tensor[], Tensor[], Tensor, Tensor, Tensor)"
)


def validate(
    scores,
    candidate_mask,
    keys,
    values,
    threshold,
    max_keep,
    min_keep,
    max_len,
    padding_side,
    max_keep_per_row,
    backend,
) -> None:
    validate_select(scores, candidate_mask, threshold, max_keep, min_keep, max_keep_per_row, backend, op=OP)
    v.check_kv_lists(OP, keys, values)
    if keys:
        B, S = scores.shape
        first = keys[0]
        if first.shape[0] != B or first.shape[2] != S:
            v.fail_value(
                OP, f"keys[0] must be [B, Hkv, S, D] with B, S = {B}, {S} from scores, got {v.describe(first)}"
            )
        v.check_same_device(OP, {"scores": scores, "keys[0]": first})
    v.check_max_len(OP, max_len)
    v.check_choice(OP, "padding_side", padding_side, v.PADDING_SIDES)


def _fake(
    scores,
    candidate_mask,
    keys,
    values,
    threshold=None,
    max_keep=0,
    min_keep=0,
    max_len=None,
    padding_side="left",
    max_keep_per_row=None,
    backend="auto",
):
    validate(
        scores,
        candidate_mask,
        keys,
        values,
        threshold,
        max_keep,
        min_keep,
        max_len,
        padding_side,
        max_keep_per_row,
        backend,
    )
    index, lengths = fake_index(scores.shape[0], max_len, scores.device)
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    length = index.shape[1]
    return fake_compacted(keys, length), fake_compacted(values, length), index, lengths, keep


def _router(
    scores,
    candidate_mask,
    keys,
    values,
    threshold=None,
    max_keep=0,
    min_keep=0,
    max_len=None,
    padding_side="left",
    max_keep_per_row=None,
    backend="auto",
):
    validate(
        scores,
        candidate_mask,
        keys,
        values,
        threshold,
        max_keep,
        min_keep,
        max_len,
        padding_side,
        max_keep_per_row,
        backend,
    )
    chosen = SPEC.resolve(backend, scores.device)
    if chosen == "reference":
        cap = select_max_keep(max_keep, max_keep_per_row)
        return prune_kv_reference(scores, candidate_mask, keys, values, threshold, cap, min_keep, max_len, padding_side)
    if candidate_mask is None:
        candidate_mask = torch.ones_like(scores, dtype=torch.bool)
    left = padding_side == "left"
    if chosen == "native":
        return torch.ops.glimpse._prune_kv_native(
            scores, candidate_mask, keys, values, threshold, max_keep, min_keep, max_keep_per_row, max_len, left
        )
    return SPEC.triton_module().prune_kv_triton(
        scores, candidate_mask, keys, values, threshold, max_keep, min_keep, max_keep_per_row, max_len, left
    )


define_op(OP, SCHEMA, _router, _fake)


def prune_kv(
    scores: Tensor,
    candidate_mask: Tensor | None,
    keys: list[Tensor],
    values: list[Tensor],
    threshold: float | None = None,
    max_keep: int | Tensor = 0,
    min_keep: int = 0,
    max_len: int | None = None,
    padding_side: str = "left",
    backend: str = "auto",
) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor, Tensor]:
    """Select tokens by score and compact every layer's KV cache to them, in one op.

    Args:
        scores: fp32 [B, S] (e.g. the VIP's logits or probabilities).
        candidate_mask: bool [B, S] or None; non-candidates are always kept.
        keys, values: lists of [B, Hkv, S, D] (one per layer), one dtype and device.
        threshold, max_keep, min_keep: as in ``select_tokens``.
        max_len, padding_side: as in ``keep_index``; with max_len given there is no host
            sync and the output shapes are static.
        backend: ``auto | reference | native | triton``.

    Returns:
        (keys, values, index, lengths, keep): compacted lists of [B, Hkv, Lmax, D] (zero
        pads), index int64 [B, Lmax] (-1 pads), lengths int64 [B], keep bool [B, S].
    """
    require_tensors(OP, scores=scores, keys=keys, values=values)
    cap, cap_per_row = split_max_keep(OP, max_keep)
    return torch.ops.glimpse.prune_kv(
        scores, candidate_mask, keys, values, threshold, cap, min_keep, max_len, padding_side, cap_per_row, backend
    )
