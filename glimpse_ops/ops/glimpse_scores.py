"""``glimpse.glimpse_scores``: scores of G glimpse query rows over every key (GQA-aware)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, declare_backends
from ..reference import (
    NORMALIZE_MODES,
    default_scale,
    glimpse_scores_backward_reference,
    glimpse_scores_reference,
)
from ._define import Call, define_native, define_op, require_tensors, run_kernel, score_dtype

OP = "glimpse_scores"
SPEC = declare_backends(OpBackends(OP, native=("cpu",), triton="glimpse_scores", fp64=("reference",)))
BACKWARD_SPEC = declare_backends(OpBackends("_glimpse_scores_backward", triton="glimpse_scores", fp64=("reference",)))
SCHEMA = (
    "(Tensor q, Tensor k, Tensor? key_mask=None, float? scale=None, str normalize='probs', "
    "str backend='auto') -> Tensor"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor? key_mask, float? scale, str normalize, "
    "Tensor out, str backend='auto') -> (Tensor, Tensor)"
)


class Kernel(NamedTuple):
    """What the native and Triton forward kernels take (normalize: 0 logits, 1 probs, 2 log-probs)."""

    q: Tensor
    k: Tensor
    key_mask: Tensor | None
    scale: float
    normalize: int


class BackwardKernel(NamedTuple):
    """What the Triton backward kernels take."""

    grad_out: Tensor
    q: Tensor
    k: Tensor
    key_mask: Tensor | None
    scale: float
    normalize: int
    out: Tensor


def validate(c: Call, op: str = OP) -> None:
    """Shared with glimpse_prune, which passes its own name as ``op``; ``c`` needs q, k,
    key_mask, scale, normalize and backend."""
    q, k = c.q, c.k
    v.check_floating(op, "q", q, "[B, H, G, D]")
    v.check_floating(op, "k", k, "[B, Hkv, S, D]")
    v.check_nonempty(op, "q", q, (0, 1, 2, 3), "[B, H, G, D]")
    v.check_nonempty(op, "k", k, (2,), "[B, Hkv, S, D]")
    if k.dtype != q.dtype:
        v.fail_type(op, f"k must have the dtype of q ({v.dtype_name(q.dtype)}), got {v.describe(k)}")
    v.check_gqa(op, q, k)
    v.check_mask(op, "key_mask", c.key_mask, k.shape[0], k.shape[2])
    v.check_same_device(op, {"q": q, "k": k, "key_mask": c.key_mask})
    v.check_scale(op, c.scale)
    v.check_choice(op, "normalize", c.normalize, NORMALIZE_MODES)
    v.check_backend(op, c.backend)


def _fake(c: Call) -> Tensor:
    validate(c)
    B, H, G, _ = c.q.shape
    return c.q.new_empty((B, H, G, c.k.shape[2]), dtype=score_dtype(c.q))


def _router(c: Call) -> Tensor:
    validate(c)
    chosen = SPEC.resolve(c.backend, c.q.device, c.q.dtype, c.q.shape[-1])
    if chosen == "reference":
        return glimpse_scores_reference(c.q, c.k, c.key_mask, c.scale, c.normalize)
    scale = default_scale(c.q.shape[-1], c.scale)
    return run_kernel(SPEC, chosen, Kernel(c.q, c.k, c.key_mask, scale, NORMALIZE_MODES.index(c.normalize)))


def _backward_fake(c: Call) -> tuple[Tensor, Tensor]:
    return torch.empty_like(c.q), torch.empty_like(c.k)


def _backward_router(c: Call) -> tuple[Tensor, Tensor]:
    chosen = BACKWARD_SPEC.resolve(c.backend, c.q.device, c.q.dtype, c.q.shape[-1])
    if chosen == "triton":
        scale, mode = default_scale(c.q.shape[-1], c.scale), NORMALIZE_MODES.index(c.normalize)
        return run_kernel(BACKWARD_SPEC, chosen, BackwardKernel(c.grad_out, c.q, c.k, c.key_mask, scale, mode, c.out))
    return glimpse_scores_backward_reference(c.grad_out, c.q, c.k, c.key_mask, c.scale, c.normalize, c.out)


SIGNATURE = define_op(OP, SCHEMA, _router, _fake)
define_native(OP, Kernel, "Tensor")
define_op("_glimpse_scores_backward", BACKWARD_SCHEMA, _backward_router, _backward_fake)


def _setup_context(ctx, inputs, output):
    c = SIGNATURE.bind(inputs, {})
    ctx.save_for_backward(c.q, c.k, c.key_mask, output)
    ctx.scale, ctx.normalize, ctx.backend = c.scale, c.normalize, c.backend


def _backward(ctx, grad_out):
    q, k, key_mask, out = ctx.saved_tensors
    # The "native" backend has no backward kernel: its gradient comes from the reference.
    backend = "auto" if ctx.backend == "native" else ctx.backend
    dq, dk = torch.ops.glimpse._glimpse_scores_backward(
        grad_out, q, k, key_mask, ctx.scale, ctx.normalize, out, backend
    )
    return (dq, dk) + (None,) * (len(SIGNATURE.names) - 2)


torch.library.register_autograd(f"glimpse::{OP}", _backward, setup_context=_setup_context)


def glimpse_scores(
    q: Tensor,
    k: Tensor,
    key_mask: Tensor | None = None,
    *,
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
