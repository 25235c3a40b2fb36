"""``glimpse.attention_column_scores``: per-key sums of attention probabilities over a
subset of query rows (ATP's S_self / S_cross, FastV-style multi-row scores)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, declare_backends
from ..reference import attention_column_scores_reference, default_scale
from ._define import Call, define_native, define_op, require_tensors, run_kernel, score_dtype

OP = "attention_column_scores"
SPEC = declare_backends(OpBackends(OP, native=("cpu",), triton="attention_column_scores", fp64=("reference",)))
SCHEMA = (
    "(Tensor q, Tensor k, Tensor? query_mask=None, Tensor? key_mask=None, bool causal=True, "
    "float? scale=None, str backend='auto') -> Tensor"
)


class Kernel(NamedTuple):
    """What the native and Triton kernels take."""

    q: Tensor
    k: Tensor
    query_mask: Tensor | None
    key_mask: Tensor | None
    causal: bool
    scale: float


def validate(c: Call) -> None:
    q, k = c.q, c.k
    v.check_floating(OP, "q", q, "[B, H, S, D]")
    v.check_floating(OP, "k", k, "[B, Hkv, S, D]")
    v.check_nonempty(OP, "q", q, (0, 1, 2, 3), "[B, H, S, D]")
    if k.dtype != q.dtype:
        v.fail_type(OP, f"k must have the dtype of q ({v.dtype_name(q.dtype)}), got {v.describe(k)}")
    v.check_gqa(OP, q, k)
    if k.shape[2] != q.shape[2]:
        v.fail_value(OP, f"k must have the sequence length of q ({q.shape[2]}), got {v.describe(k)}")
    B, _, S, _ = q.shape
    v.check_mask(OP, "query_mask", c.query_mask, B, S)
    v.check_mask(OP, "key_mask", c.key_mask, B, S)
    v.check_same_device(OP, {"q": q, "k": k, "query_mask": c.query_mask, "key_mask": c.key_mask})
    v.check_scale(OP, c.scale)
    v.check_backend(OP, c.backend)


def _fake(c: Call) -> Tensor:
    validate(c)
    return c.q.new_empty(c.q.shape[:3], dtype=score_dtype(c.q))


def _router(c: Call) -> Tensor:
    validate(c)
    chosen = SPEC.resolve(c.backend, c.q.device, c.q.dtype, c.q.shape[-1])
    if chosen == "reference":
        return attention_column_scores_reference(c.q, c.k, c.query_mask, c.key_mask, c.causal, c.scale)
    scale = default_scale(c.q.shape[-1], c.scale)
    return run_kernel(SPEC, chosen, Kernel(c.q, c.k, c.query_mask, c.key_mask, c.causal, scale))


define_op(OP, SCHEMA, _router, _fake)
define_native(OP, Kernel, "Tensor")


def attention_column_scores(
    q: Tensor,
    k: Tensor,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """How much attention each key receives from a chosen set of query rows.

    Args:
        q: [B, H, S, D] queries, fp32/fp16/bf16.
        k: [B, Hkv, S, D] keys, q's dtype, H % Hkv == 0.
        query_mask: bool [B, S], the rows to sum over; None means every row.
        key_mask: bool [B, S], False for padding keys; None means every key.
        causal: row i sees keys j <= i only.
        scale: logit scale, default ``1 / sqrt(D)``.
        backend: ``auto | reference | native | triton`` (``auto``: native on CPU, Triton on
            CUDA; fp64 runs on ``reference``).

    Returns:
        fp32 [B, H, S]: ``out[b, h, j] = sum over selected rows i of P[b, h, i, j]``, with P
        the row softmax over the keys row i sees (a row that sees none adds nothing).
        Not differentiable.
    """
    require_tensors(OP, q=q, k=k)
    return torch.ops.glimpse.attention_column_scores(q, k, query_mask, key_mask, causal, scale, backend)
