"""``glimpse.soft_mask_attention``: attention with a differentiable per-key weight (ATP).

The public op is a composite over ``glimpse::_soft_mask_attention_forward`` (out and the
per-row log-sum-exp L, which carries the autograd) and ``_soft_mask_attention_backward``
(which takes the saved out and L, as a FlashAttention backward does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, declare_backends
from ..reference import default_scale, soft_mask_attention_backward_reference, soft_mask_attention_forward_reference
from ._define import Call, Signature, define_native, define_op, require_tensors, run_kernel

OP = "soft_mask_attention"
SPEC = declare_backends(OpBackends(OP, native=("cpu",), triton="soft_mask_attention", fp64=("reference",)))
FORWARD_SPEC = declare_backends(
    OpBackends("_soft_mask_attention_forward", native=("cpu",), triton="soft_mask_attention", fp64=("reference",))
)
BACKWARD_SPEC = declare_backends(
    OpBackends("_soft_mask_attention_backward", native=("cpu",), triton="soft_mask_attention", fp64=("reference",))
)
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


class ForwardKernel(NamedTuple):
    """What the native and Triton forward kernels take; they return (out, L fp32 [B, H, N])."""

    q: Tensor
    k: Tensor
    v: Tensor
    key_weight: Tensor
    key_mask: Tensor | None
    causal: bool
    scale: float


class BackwardKernel(NamedTuple):
    """What the native and Triton backward kernels take; they return (dq, dk, dv, dw)."""

    grad_out: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    key_weight: Tensor
    key_mask: Tensor | None
    causal: bool
    scale: float
    out: Tensor
    lse: Tensor


def validate(c: Call) -> None:
    q, key_weight = c.q, c.key_weight
    v.check_floating(OP, "q", q, "[B, H, N, D]")
    v.check_nonempty(OP, "q", q, (0, 1, 2, 3), "[B, H, N, D]")
    for name, t in (("k", c.k), ("v", c.v)):
        v.check_floating(OP, name, t, "[B, Hkv, N, D]")
        if t.dtype != q.dtype:
            v.fail_type(OP, f"{name} must have the dtype of q ({v.dtype_name(q.dtype)}), got {v.describe(t)}")
        if t.shape[2] != q.shape[2]:
            v.fail_value(OP, f"{name} must have the sequence length of q ({q.shape[2]}), got {v.describe(t)}")
    v.check_gqa(OP, q, c.k)
    if c.v.shape != c.k.shape:
        v.fail_value(OP, f"v must have the shape of k {v.describe(c.k)}, got {v.describe(c.v)}")
    B, N = q.shape[0], q.shape[2]
    v.check_tensor(OP, "key_weight", key_weight)
    v.check_dtype(OP, "key_weight", key_weight, v.FLOAT_DTYPES, "[B, N]")
    if tuple(key_weight.shape) != (B, N):
        v.fail_value(OP, f"key_weight must be [B, N] = [{B}, {N}], got {v.describe(key_weight)}")
    v.check_mask(OP, "key_mask", c.key_mask, B, N)
    v.check_same_device(OP, {"q": q, "k": c.k, "v": c.v, "key_weight": key_weight, "key_mask": c.key_mask})
    v.check_scale(OP, c.scale)
    v.check_backend(OP, c.backend)
    if v.reads_data_cheaply(key_weight):
        w = key_weight.detach()
        inside = (w >= 0) & (w <= 1)
        if not bool(inside.all()):
            v.fail_value(OP, f"key_weight values must be in [0, 1], got {w[~inside][0].item()}")


def _composite(*args, **kwargs) -> Tensor:
    c = SIGNATURE.bind(args, kwargs)
    validate(c)
    return torch.ops.glimpse._soft_mask_attention_forward(c.q, c.k, c.v, c.key_weight, c.key_mask, c.causal, c.scale,
                                                          c.backend)[0]  # fmt: skip


def _forward_fake(c: Call) -> tuple[Tensor, Tensor]:
    lse_dtype = torch.float64 if c.q.dtype == torch.float64 else torch.float32
    return torch.empty_like(c.q), c.q.new_empty(c.q.shape[:3], dtype=lse_dtype)


def _forward_router(c: Call) -> tuple[Tensor, Tensor]:
    chosen = SPEC.resolve(c.backend, c.q.device, c.q.dtype, c.q.shape[-1])
    if chosen == "reference":
        return soft_mask_attention_forward_reference(c.q, c.k, c.v, c.key_weight, c.key_mask, c.causal, c.scale)
    scale = default_scale(c.q.shape[-1], c.scale)
    return run_kernel(FORWARD_SPEC, chosen, ForwardKernel(c.q, c.k, c.v, c.key_weight, c.key_mask, c.causal, scale))


def _backward_fake(c: Call) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.empty_like(c.q), torch.empty_like(c.k), torch.empty_like(c.v), torch.empty_like(c.key_weight)


def _backward_router(c: Call) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    chosen = BACKWARD_SPEC.resolve(c.backend, c.q.device, c.q.dtype, c.q.shape[-1])
    if chosen != "reference":
        kernel = BackwardKernel(c.grad_out, c.q, c.k, c.v, c.key_weight, c.key_mask, c.causal,
                                default_scale(c.q.shape[-1], c.scale), c.out, c.lse)  # fmt: skip
        return run_kernel(BACKWARD_SPEC, chosen, kernel)
    return soft_mask_attention_backward_reference(
        c.grad_out, c.q, c.k, c.v, c.key_weight, c.key_mask, c.causal, c.scale
    )


torch.library.define(f"glimpse::{OP}", SCHEMA)
torch.library.impl(f"glimpse::{OP}", "CompositeImplicitAutograd")(_composite)
SIGNATURE = Signature(OP, SCHEMA)
FORWARD_SIGNATURE = define_op("_soft_mask_attention_forward", FORWARD_SCHEMA, _forward_router, _forward_fake)
define_op("_soft_mask_attention_backward", BACKWARD_SCHEMA, _backward_router, _backward_fake)
define_native("_soft_mask_attention_forward", ForwardKernel, "(Tensor, Tensor)")
define_native("_soft_mask_attention_backward", BackwardKernel, "(Tensor, Tensor, Tensor, Tensor)")


def _setup_context(ctx, inputs, output):
    c = FORWARD_SIGNATURE.bind(inputs, {})
    out, lse = output
    ctx.save_for_backward(c.q, c.k, c.v, c.key_weight, c.key_mask, out, lse)
    ctx.causal, ctx.scale, ctx.backend = c.causal, c.scale, c.backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v_, key_weight, key_mask, out, lse = ctx.saved_tensors
    dq, dk, dv, dw = torch.ops.glimpse._soft_mask_attention_backward(
        grad_out, q, k, v_, key_weight, key_mask, ctx.causal, ctx.scale, out, lse, ctx.backend
    )
    return (dq, dk, dv, dw) + (None,) * (len(FORWARD_SIGNATURE.names) - 4)


torch.library.register_autograd("glimpse::_soft_mask_attention_forward", _backward, setup_context=_setup_context)


def soft_mask_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_weight: Tensor,
    key_mask: Tensor | None = None,
    *,
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
        backend: ``auto | reference | native | triton`` (``auto``: native on CPU, Triton on
            CUDA; fp64 runs on ``reference``).

    Returns:
        [B, H, N, D] in q's dtype: ``P[i, j] = w_j exp(s_ij) / sum_l w_l exp(s_il)`` over
        allowed l, i.e. ``softmax(s + log w)``. Differentiable in q, k, v and key_weight; the
        weight gradient is finite at w = 0; a row whose allowed weights sum to 0 gives 0
        and zero gradients. With w in {0, 1} this is attention over the kept keys only.
    """
    require_tensors(OP, q=q, k=k, v=v, key_weight=key_weight)
    return torch.ops.glimpse.soft_mask_attention(q, k, v, key_weight, key_mask, causal, scale, backend)
