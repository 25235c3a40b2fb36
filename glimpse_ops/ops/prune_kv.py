"""``glimpse.prune_kv``: select_tokens + keep_index + compact_kv as one op (the VIP path)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, declare_backends
from ..reference import prune_kv_reference
from ._define import (
    Call,
    all_true,
    define_native,
    define_op,
    require_tensors,
    run_kernel,
    select_max_keep,
    split_max_keep,
)
from .compact_kv import fake_compacted
from .keep_index import fake_index
from .select_tokens import validate as validate_select

OP = "prune_kv"
SPEC = declare_backends(OpBackends(OP, native=("cpu",), triton="prune_kv"))
SCHEMA = (
    "(Tensor scores, Tensor? candidate_mask, Tensor[] keys, Tensor[] values, "
    "float? threshold=None, int max_keep=0, int min_keep=0, int? max_len=None, "
    "str padding_side='left', Tensor? max_keep_per_row=None, str backend='auto') "
    "-> (Tensor[], Tensor[], Tensor, Tensor, Tensor)"
)


class Kernel(NamedTuple):
    """What the native and Triton kernels take."""

    scores: Tensor
    candidate_mask: Tensor
    keys: list[Tensor]
    values: list[Tensor]
    threshold: float | None
    max_keep: int
    min_keep: int
    max_keep_per_row: Tensor | None
    max_len: int | None
    left_padding: bool


def validate(c: Call) -> None:
    validate_select(c, op=OP)
    v.check_kv_lists(OP, c.keys, c.values)
    if c.keys:
        B, S = c.scores.shape
        first = c.keys[0]
        if first.shape[0] != B or first.shape[2] != S:
            v.fail_value(
                OP, f"keys[0] must be [B, Hkv, S, D] with B, S = {B}, {S} from scores, got {v.describe(first)}"
            )
        v.check_same_device(OP, {"scores": c.scores, "keys[0]": first})
    v.check_max_len(OP, c.max_len)
    v.check_choice(OP, "padding_side", c.padding_side, v.PADDING_SIDES)


def _fake(c: Call) -> tuple:
    validate(c)
    index, lengths = fake_index(c.scores.shape[0], c.max_len, c.scores.device)
    keep = torch.empty(c.scores.shape, dtype=torch.bool, device=c.scores.device)
    length = index.shape[1]
    return fake_compacted(c.keys, length), fake_compacted(c.values, length), index, lengths, keep


def _router(c: Call) -> tuple:
    validate(c)
    chosen = SPEC.resolve(c.backend, c.scores.device)
    if chosen == "reference":
        cap = select_max_keep(c.max_keep, c.max_keep_per_row)
        return prune_kv_reference(
            c.scores, c.candidate_mask, c.keys, c.values, c.threshold, cap, c.min_keep, c.max_len, c.padding_side
        )
    kernel = Kernel(
        c.scores, all_true(c.scores, c.candidate_mask), c.keys, c.values, c.threshold, c.max_keep, c.min_keep,
        c.max_keep_per_row, c.max_len, c.padding_side == "left",
    )  # fmt: skip
    out = run_kernel(SPEC, chosen, kernel)
    v.check_kernel_lengths(chosen, out[3], c.max_len)
    return out


define_op(OP, SCHEMA, _router, _fake)
define_native(OP, Kernel, "(Tensor[], Tensor[], Tensor, Tensor, Tensor)")


def prune_kv(
    scores: Tensor,
    candidate_mask: Tensor | None,
    keys: list[Tensor],
    values: list[Tensor],
    *,
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
