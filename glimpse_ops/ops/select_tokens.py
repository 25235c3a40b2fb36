"""``glimpse.select_tokens``: keep mask from scores (threshold, top-k cap, minimum count)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, register
from ..reference import select_tokens_reference
from ._register import define_op, require_tensors, select_max_keep, split_max_keep

OP = "select_tokens"
SPEC = register(OpBackends(OP, native=("cpu",), triton="select_tokens"))
SCHEMA = (
    "(Tensor scores, Tensor? candidate_mask=None, float? threshold=None, int max_keep=0, "
    "int min_keep=0, Tensor? max_keep_per_row=None, str backend='auto') -> Tensor"
)


def validate(
    scores: Tensor,
    candidate_mask: Tensor | None,
    threshold: float | None,
    max_keep: int,
    min_keep: int,
    max_keep_per_row: Tensor | None,
    backend: str,
    op: str = OP,
) -> None:
    """Shared with prune_kv and glimpse_prune, which pass their own name as ``op``."""
    v.check_tensor(op, "scores", scores)
    v.check_dtype(op, "scores", scores, (torch.float32,), "[B, S]")
    v.check_rank(op, "scores", scores, 2, "fp32 [B, S]")
    v.check_nonempty(op, "scores", scores, (0, 1), "fp32 [B, S]")
    B, S = scores.shape
    v.check_mask(op, "candidate_mask", candidate_mask, B, S)
    v.check_select_args(op, B, threshold, max_keep, min_keep, max_keep_per_row)
    v.check_same_device(op, {"scores": scores, "candidate_mask": candidate_mask, "max_keep": max_keep_per_row})
    v.check_backend(op, backend)


def _fake(scores, candidate_mask=None, threshold=None, max_keep=0, min_keep=0, max_keep_per_row=None, backend="auto"):
    validate(scores, candidate_mask, threshold, max_keep, min_keep, max_keep_per_row, backend)
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def _router(scores, candidate_mask=None, threshold=None, max_keep=0, min_keep=0, max_keep_per_row=None, backend="auto"):
    validate(scores, candidate_mask, threshold, max_keep, min_keep, max_keep_per_row, backend)
    chosen = SPEC.resolve(backend, scores.device)
    if chosen == "reference":
        cap = select_max_keep(max_keep, max_keep_per_row)
        return select_tokens_reference(scores, candidate_mask, threshold, cap, min_keep)
    if candidate_mask is None:
        candidate_mask = torch.ones_like(scores, dtype=torch.bool)
    if chosen == "native":
        return torch.ops.glimpse._select_tokens_native(
            scores, candidate_mask, threshold, max_keep, min_keep, max_keep_per_row
        )
    return SPEC.triton_module().select_tokens_triton(
        scores, candidate_mask, threshold, max_keep, min_keep, max_keep_per_row
    )


define_op(OP, SCHEMA, _router, _fake)


def select_tokens(
    scores: Tensor,
    candidate_mask: Tensor | None = None,
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
