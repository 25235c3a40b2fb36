"""``glimpse.glimpse_prune``: the training-free fused path: glimpse probabilities of one
layer averaged over heads and glimpse rows, then select, index and compact every layer."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, declare_backends
from ..reference import default_scale, glimpse_prune_reference
from ._define import (
    Call,
    all_true,
    define_native,
    define_op,
    require_tensors,
    run_kernel,
    score_dtype,
    select_max_keep,
    split_max_keep,
)
from .compact_kv import fake_compacted
from .glimpse_scores import validate as validate_scores
from .keep_index import fake_index

OP = "glimpse_prune"
SPEC = declare_backends(OpBackends(OP, native=("cpu",), triton="glimpse_prune", fp64=("reference",)))
SCHEMA = (
    "(Tensor q, Tensor[] keys, Tensor[] values, Tensor? key_mask, Tensor? candidate_mask, "
    "int score_layer, float? scale=None, float? threshold=None, int max_keep=0, "
    "int min_keep=0, int? max_len=None, str padding_side='left', "
    "Tensor? max_keep_per_row=None, str backend='auto') "
    "-> (Tensor[], Tensor[], Tensor, Tensor, Tensor)"
)


class Kernel(NamedTuple):
    """What the native and Triton kernels take."""

    q: Tensor
    keys: list[Tensor]
    values: list[Tensor]
    key_mask: Tensor
    candidate_mask: Tensor
    score_layer: int
    scale: float
    threshold: float | None
    max_keep: int
    min_keep: int
    max_keep_per_row: Tensor | None
    max_len: int | None
    left_padding: bool


def validate(c: Call) -> None:
    v.check_kv_lists(OP, c.keys, c.values)
    if not c.keys:
        v.fail_value(OP, "keys must hold at least one layer, got an empty list")
    if not 0 <= c.score_layer < len(c.keys):
        v.fail_value(OP, f"score_layer must be in [0, {len(c.keys)}), got {c.score_layer}")
    validate_scores(Call(q=c.q, k=c.keys[c.score_layer], key_mask=c.key_mask, scale=c.scale, normalize="probs",
                         backend=c.backend), op=OP)  # fmt: skip
    B, S = c.keys[0].shape[0], c.keys[0].shape[2]
    v.check_mask(OP, "candidate_mask", c.candidate_mask, B, S)
    v.check_same_device(OP, {"q": c.q, "candidate_mask": c.candidate_mask, "max_keep": c.max_keep_per_row})
    v.check_select_args(OP, B, c.threshold, c.max_keep, c.min_keep, c.max_keep_per_row)
    v.check_max_len(OP, c.max_len)
    v.check_choice(OP, "padding_side", c.padding_side, v.PADDING_SIDES)


def _fake(c: Call) -> tuple:
    validate(c)
    B, S = c.keys[0].shape[0], c.keys[0].shape[2]
    index, lengths = fake_index(B, c.max_len, c.q.device)
    scores = c.q.new_empty((B, S), dtype=score_dtype(c.q))
    length = index.shape[1]
    return fake_compacted(c.keys, length), fake_compacted(c.values, length), index, lengths, scores


def _router(c: Call) -> tuple:
    validate(c)
    chosen = SPEC.resolve(c.backend, c.q.device, c.q.dtype, c.q.shape[-1])
    if chosen == "reference":
        cap = select_max_keep(c.max_keep, c.max_keep_per_row)
        return glimpse_prune_reference(
            c.q, c.keys, c.values, c.key_mask, c.candidate_mask, c.score_layer, c.scale, c.threshold, cap,
            c.min_keep, c.max_len, c.padding_side,
        )  # fmt: skip
    first = c.keys[0]
    kernel = Kernel(
        c.q, c.keys, c.values, all_true(first[:, 0], c.key_mask), all_true(first[:, 0], c.candidate_mask),
        c.score_layer, default_scale(c.q.shape[-1], c.scale), c.threshold, c.max_keep, c.min_keep,
        c.max_keep_per_row, c.max_len, c.padding_side == "left",
    )  # fmt: skip
    out = run_kernel(SPEC, chosen, kernel)
    v.check_kernel_lengths(chosen, out[3], c.max_len)
    return out


define_op(OP, SCHEMA, _router, _fake)
define_native(OP, Kernel, "(Tensor[], Tensor[], Tensor, Tensor, Tensor)")


def glimpse_prune(
    q: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    key_mask: Tensor | None,
    candidate_mask: Tensor | None,
    score_layer: int,
    *,
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
