"""``glimpse.soft_mask_attention``: attention with a differentiable per-key weight (ATP).

The public op is a composite over ``glimpse::_soft_mask_attention_forward`` (out and the
per-row log-sum-exp L, which carries the autograd) and ``_soft_mask_attention_backward``
(which takes the saved out and L, as a FlashAttention backward does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, register
from ..reference import default_scale, soft_mask_attention_backward_reference, soft_mask_attention_forward_reference
from ._register import define_op, require_tensors

OP = "soft_mask_attention"
SPEC = register(OpBackends(OP, triton="soft_mask_attention", fp64=("reference",)))
BACKWARD_SPEC = register(OpBackends("_soft_mask_attention_backward", triton="soft_mask_attention", fp64=("reference",)))
SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor key_weight, Tensor? key_mask=None, bool causal=True, "
    "float? scale=None, str backend='auto') -> Tensor"
)
FORWARD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor key_weight, Tensor? key_mask, bool causal, "
    "float? scale, str backend='auto') -> (Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor key_weight, Tensor? key_mask, "
    "bool causal, float? scale, Tensor out, Tensor lse, str backend='auto') "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


def validate(q, k, v_, key_weight, key_mask, causal, scale, backend) -> None:
    v.check_floating(OP, "q", q, "[B, H, N, D]")
    v.check_nonempty(OP, "q", q, (0, 1, 2, 3), "[B, H, N, D]")
    for name, t in (("k", k), ("v", v_)):
        v.check_floating(OP, name, t, "[B, Hkv, N, D]")
        if t.dtype != q.dtype:
            v.fail_type(OP, f"{name} must have the dtype of q ({v.dtype_name(q.dtype)}), got {v.describe(t)}")
        if t.shape[2] != q.shape[2]:
            v.fail_value(OP, f"{name} must have the sequence length of q ({q.shape[2]}), got {v.describe(t)}")
    v.check_gqa(OP, q, k)
    if v_.shape != k.shape:
        v.fail_value(OP, f"v must have the shape of k {v.describe(k)}, got {v.describe(v_)}")
    B, N = q.shape[0], q.shape[2]
    v.check_tensor(OP, "key_weight", key_weight)
    v.check_dtype(OP, "key_weight", key_weight, v.FLOAT_DTYPES, "[B, N]")
    if tuple(key_weight.shape) != (B, N):
        v.fail_value(OP, f"key_weight must be [B, N] = [{B}, {N}], got {v.describe(key_weight)}")
    v.check_mask(OP, "key_mask", key_mask, B, N)
    v.check_same_device(OP, {"q": q, "k": k, "v": v_, "key_weight": key_weight, "key_mask": key_mask})
    v.check_scale(OP, scale)
    v.check_backend(OP, backend)
    if v.reads_data_cheaply(key_weight):
        w = key_weight.detach()
        inside = (w >= 0) & (w <= 1)
        if not bool(inside.all()):
            v.fail_value(OP, f"key_weight values must be in [0, 1], got {w[~inside][0].item()}")


def _composite(q, k, v_, key_weight, key_mask=None, causal=True, scale=None, backend="auto"):
    validate(q, k, v_, key_weight, key_mask, causal, scale, backend)
    return torch.ops.glimpse._soft_mask_attention_forward(q, k, v_, key_weight, key_mask, causal, scale, backend)[0]


def _forward_fake(q, k, v_, key_weight, key_mask, causal, scale, backend="auto"):
    return torch.empty_like(q), q.new_empty(
        q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32
    )


def _forward_router(q, k, v_, key_weight, key_mask, causal, scale, backend="auto"):
    chosen = SPEC.resolve(backend, q.device, q.dtype, q.shape[-1])
    if chosen == "reference":
        return soft_mask_attention_forward_reference(q, k, v_, key_weight, key_mask, causal, scale)
    return SPEC.triton_module().soft_mask_attention_forward_triton(
        q, k, v_, key_weight, key_mask, causal, default_scale(q.shape[-1], scale)
    )


def _backward_fake(grad_out, q, k, v_, key_weight, key_mask, causal, scale, out, lse, backend="auto"):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v_), torch.empty_like(key_weight)


def _backward_router(grad_out, q, k, v_, key_weight, key_mask, causal, scale, out, lse, backend="auto"):
    chosen = BACKWARD_SPEC.resolve(backend, q.device, q.dtype, q.shape[-1])
    if chosen == "triton":
        return BACKWARD_SPEC.triton_module().soft_mask_attention_backward_triton(
            grad_out, q, k, v_, key_weight, key_mask, causal, default_scale(q.shape[-1], scale), out, lse
        )
    return soft_mask_attention_backward_reference(grad_out, q, k, v_, key_weight, key_mask, causal, scale)


torch.library.define(f"glimpse::{OP}", SCHEMA)
torch.library.impl(f"glimpse::{OP}", "CompositeImplicitAutograd")(_composite)
define_op("_soft_mask_attention_forward", FORWARD_SCHEMA, _forward_router, _forward_fake)
define_op("_soft_mask_attention_backward", BACKWARD_SCHEMA, _backward_router, _backward_fake)


def _setup_context(ctx, inputs, output):
    q, k, v_, key_weight, key_mask, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v_, key_weight, key_mask, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v_, key_weight, key_mask, out, lse = ctx.saved_tensors
    dq, dk, dv, dw = torch.ops.glimpse._soft_mask_attention_backward(
        grad_out, q, k, v_, key_weight, key_mask, ctx.causal, ctx.scale, out, lse, ctx.backend
    )
    return dq, dk, dv, dw, None, None, None, None


torch.library.register_autograd("glimpse::_soft_mask_attention_forward", _backward, setup_context=_setup_context)


def soft_mask_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_weight: Tensor,
    key_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention where every key carries a soft keep weight in [0, 1].

    Args:
        q: [B, H, N, D] queries, fp32/fp16/bf16.
        k, v: [B, Hkv, N, D], q's dtype, H % Hkv == 0 (no repeated KV heads materialized).
        key_weight: [B, N] float in [0, 1] (checked on CPU), shared by all heads.
        key_mask: bool [B, N], False for padding keys; None means every key.
        causal: row i sees keys j <= i only.
        scale: logit scale, default ``1 / sqrt(D)``.
        backend: ``auto | reference | native | triton``.

    Returns:
        [B, H, N, D] in q's dtype: ``P[i, j] = w_j exp(s_ij) / sum_l w_l exp(s_il)`` over
        allowed l, i.e. ``softmax(s + log w)``. Differentiable in q, k, v and key_weight; the
        weight gradient is finite at w = 0; a row whose allowed weights sum to 0 gives 0
        and zero gradients. With w in {0, 1} this is attention over the kept keys only.
    """
    require_tensors(OP, q=q, k=k, v=v, key_weight=key_weight)
    return torch.ops.glimpse.soft_mask_attention(q, k, v, key_weight, key_mask, causal, scale, backend)
