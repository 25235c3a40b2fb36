"""``glimpse.select_tokens``: keep mask from scores (threshold, top-k cap, minimum count)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, declare_backends
from ..reference import select_tokens_reference
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

OP = "select_tokens"
SPEC = declare_backends(OpBackends(OP, native=("cpu",), triton="select_tokens"))
SCHEMA = (
    "(Tensor scores, Tensor? candidate_mask=None, float? threshold=None, int max_keep=0, "
    "int min_keep=0, Tensor? max_keep_per_row=None, str backend='auto') -> Tensor"
)


class Kernel(NamedTuple):
    """What the native and Triton kernels take."""

    scores: Tensor
    candidate_mask: Tensor
    threshold: float | None
    max_keep: int
    min_keep: int
    max_keep_per_row: Tensor | None


def validate(c: Call, op: str = OP) -> None:
    """Shared with prune_kv and glimpse_prune, which pass their own name as ``op``; ``c`` needs
    scores, candidate_mask, threshold, max_keep, min_keep, max_keep_per_row and backend."""
    v.check_tensor(op, "scores", c.scores)
    v.check_dtype(op, "scores", c.scores, (torch.float32,), "[B, S]")
    v.check_rank(op, "scores", c.scores, 2, "fp32 [B, S]")
    v.check_nonempty(op, "scores", c.scores, (0, 1), "fp32 [B, S]")
    B, S = c.scores.shape
    v.check_mask(op, "candidate_mask", c.candidate_mask, B, S)
    v.check_select_args(op, B, c.threshold, c.max_keep, c.min_keep, c.max_keep_per_row)
    v.check_same_device(op, {"scores": c.scores, "candidate_mask": c.candidate_mask, "max_keep": c.max_keep_per_row})
    v.check_backend(op, c.backend)


def _fake(c: Call) -> Tensor:
    validate(c)
    return torch.empty(c.scores.shape, dtype=torch.bool, device=c.scores.device)


def _router(c: Call) -> Tensor:
    validate(c)
    chosen = SPEC.resolve(c.backend, c.scores.device)
    if chosen == "reference":
        cap = select_max_keep(c.max_keep, c.max_keep_per_row)
        return select_tokens_reference(c.scores, c.candidate_mask, c.threshold, cap, c.min_keep)
    kernel = Kernel(
        c.scores, all_true(c.scores, c.candidate_mask), c.threshold, c.max_keep, c.min_keep, c.max_keep_per_row
    )
    return run_kernel(SPEC, chosen, kernel)


define_op(OP, SCHEMA, _router, _fake)
define_native(OP, Kernel, "Tensor")


def select_tokens(
    scores: Tensor,
    candidate_mask: Tensor | None = None,
    *,
    threshold: float | None = None,
    max_keep: int | Tensor = 0,
    min_keep: int = 0,
    backend: str = "auto",
) -> Tensor:
    """Decide which tokens to keep from their scores.

    Args:
        scores: fp32 [B, S], higher is more important. NaN ranks lowest.
        candidate_mask: bool [B, S] or None (every token is a candidate). Non-candidates
            (text tokens, say) are always kept.
        threshold: keep candidates with ``score > threshold`` (compared in fp32); None
            keeps every candidate before the cap.
        max_keep: int or int64 [B]; if more candidates pass, keep only the best max_keep.
            ``<= 0``: no cap.
        min_keep: if fewer pass, keep the best ``min(min_keep, n_candidates)``.
        backend: ``auto | reference | native | triton``.

    Returns:
        keep, bool [B, S]. Ranking: higher score first, equal scores lower index first, NaN
        last. Deterministic; no host sync on any backend.
    """
    require_tensors(OP, scores=scores)
    cap, cap_per_row = split_max_keep(OP, max_keep)
    return torch.ops.glimpse.select_tokens(scores, candidate_mask, threshold, cap, min_keep, cap_per_row, backend)
