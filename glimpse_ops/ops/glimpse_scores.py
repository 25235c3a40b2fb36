"""``glimpse.glimpse_scores``: scores of G glimpse query rows over every key (GQA-aware)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, register
from ..reference import (
    NORMALIZE_MODES,
    default_scale,
    glimpse_scores_backward_reference,
    glimpse_scores_reference,
)
from ._register import define_op, require_tensors, score_dtype

OP = "glimpse_scores"
SPEC = register(OpBackends(OP, native=("cpu",), triton="glimpse_scores", fp64=("reference",)))
BACKWARD_SPEC = register(OpBackends("_glimpse_scores_backward", triton="glimpse_scores", fp64=("reference",)))
SCHEMA = (
    "(Tensor q, Tensor k, Tensor? key_mask=None, float? scale=None, str normalize='probs', "
    "str backend='auto') -> Tensor"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor? key_mask, float? scale, str normalize, "
    "Tensor out, str backend='auto') -> (Tensor, Tensor)"
)


def validate(
    q: Tensor, k: Tensor, key_mask: Tensor | None, scale: float | None, normalize: str, backend: str, op: str = OP
) -> None:
    """Shared with glimpse_prune, which passes its own name as ``op``."""
    v.check_floating(op, "q", q, "[B, H, G, D]")
    v.check_floating(op, "k", k, "[B, Hkv, S, D]")
    v.check_nonempty(op, "q", q, (0, 1, 2, 3), "[B, H, G, D]")
    v.check_nonempty(op, "k", k, (2,), "[B, Hkv, S, D]")
    if k.dtype != q.dtype:
        v.fail_type(op, f"k must have the dtype of q ({v.dtype_name(q.dtype)}), got {v.describe(k)}")
    v.check_gqa(op, q, k)
    v.check_mask(op, "key_mask", key_mask, k.shape[0], k.shape[2])
    v.check_same_device(op, {"q": q, "k": k, "key_mask": key_mask})
    v.check_scale(op, scale)
    v.check_choice(op, "normalize", normalize, NORMALIZE_MODES)
    v.check_backend(op, backend)


def _fake(q, k, key_mask=None, scale=None, normalize="probs", backend="auto"):
    validate(q, k, key_mask, scale, normalize, backend)
    B, H, G, _ = q.shape
    return q.new_empty((B, H, G, k.shape[2]), dtype=score_dtype(q))


def _router(q, k, key_mask=None, scale=None, normalize="probs", backend="auto"):
    validate(q, k, key_mask, scale, normalize, backend)
    chosen = SPEC.resolve(backend, q.device, q.dtype, q.shape[-1])
    if chosen == "reference":
        return glimpse_scores_reference(q, k, key_mask, scale, normalize)
    mode = NORMALIZE_MODES.index(normalize)
    if chosen == "native":
        return torch.ops.glimpse._glimpse_scores_native(q, k, key_mask, default_scale(q.shape[-1], scale), mode)
    return SPEC.triton_module().glimpse_scores_triton(q, k, key_mask, default_scale(q.shape[-1], scale), mode)


def _backward_fake(grad_out, q, k, key_mask, scale, normalize, out, backend="auto"):
    return torch.empty_like(q), torch.empty_like(k)


def _backward_router(grad_out, q, k, key_mask, scale, normalize, out, backend="auto"):
    chosen = BACKWARD_SPEC.resolve(backend, q.device, q.dtype, q.shape[-1])
    if chosen == "triton":
        mode = NORMALIZE_MODES.index(normalize)
        return BACKWARD_SPEC.triton_module().glimpse_scores_backward_triton(
            grad_out, q, k, key_mask, default_scale(q.shape[-1], scale), mode, out
        )
    return glimpse_scores_backward_reference(grad_out, q, k, key_mask, scale, normalize, out)


define_op(OP, SCHEMA, _router, _fake)
define_op("_glimpse_scores_backward", BACKWARD_SCHEMA, _backward_router, _backward_fake)


def _setup_context(ctx, inputs, output):
    q, k, key_mask, scale, normalize, backend = inputs
    ctx.save_for_backward(q, k, key_mask, output)
    ctx.scale, ctx.normalize, ctx.backend = scale, normalize, backend


def _backward(ctx, grad_out):
    q, k, key_mask, out = ctx.saved_tensors
    # The "native" backend has no backward kernel: its gradient comes from the reference.
    backend = "auto" if ctx.backend == "native" else ctx.backend
    dq, dk = torch.ops.glimpse._glimpse_scores_backward(
        grad_out, q, k, key_mask, ctx.scale, ctx.normalize, out, backend
    )
    return dq, dk, None, None, None, None


torch.library.register_autograd(f"glimpse::{OP}", _backward, setup_context=_setup_context)


def glimpse_scores(
    q: Tensor,
    k: Tensor,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    normalize: str = "probs",
    backend: str = "auto",
) -> Tensor:
    """Attention scores of G glimpse query rows against all S keys of one layer.

    Args:
        q: [B, H, G, D] glimpse queries (after RoPE), fp32/fp16/bf16.
        k: [B, Hkv, S, D] keys of the same layer, q's dtype; H % Hkv == 0 and head h reads
            KV head ``h // (H // Hkv)`` (no repeated KV heads are materialized).
        key_mask: bool [B, S], False for padding; None means every key is valid.
        scale: logit scale, default ``1 / sqrt(D)``.
        normalize: ``logits`` (scaled q.k, -inf at invalid keys), ``probs`` (softmax over
            valid keys, 0 at invalid ones) or ``log_probs`` (log-softmax, -inf at invalid).
        backend: ``auto | reference | native | triton``.

    Returns:
        fp32 [B, H, G, S] (fp64 for fp64 inputs). Only the G rows are computed. Differentiable in q and k.
    """
    require_tensors(OP, q=q, k=k)
    return torch.ops.glimpse.glimpse_scores(q, k, key_mask, scale, normalize, backend)
