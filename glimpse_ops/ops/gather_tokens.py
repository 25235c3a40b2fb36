"""``glimpse.gather_tokens``: gather tokens of x along dim 1 by an index with -1 pads."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, register
from ..reference import gather_tokens_reference
from ._register import define_op, require_tensors

OP = "gather_tokens"
SPEC = register(OpBackends(OP, native=("cpu",), triton="gather_tokens"))
SCHEMA = "(Tensor x, Tensor index, Scalar pad_value=0, str backend='auto') -> Tensor"


def validate(x: Tensor, index: Tensor, pad_value: float | int | bool, backend: str) -> None:
    v.check_tensor(OP, "x", x)
    if x.dim() < 2:
        v.fail_value(OP, f"x must be [B, S, ...] (at least 2-D), got {v.describe(x)}")
    v.check_index(OP, index, x.shape[0], x.shape[1])
    v.check_same_device(OP, {"x": x, "index": index})
    if not isinstance(pad_value, (bool, int, float)):
        v.fail_type(OP, f"pad_value must be a bool, int or float, got {type(pad_value).__name__}")
    exact = x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex())
    if exact and isinstance(pad_value, float) and not pad_value.is_integer():
        v.fail_type(OP, f"pad_value must be integral for {v.dtype_name(x.dtype)} x, got {pad_value}")
    v.check_backend(OP, backend)


def _fake(x, index, pad_value=0, backend="auto"):
    validate(x, index, pad_value, backend)
    return x.new_empty((x.shape[0], index.shape[1], *x.shape[2:]))


def _router(x, index, pad_value=0, backend="auto"):
    validate(x, index, pad_value, backend)
    chosen = SPEC.resolve(backend, x.device)
    if chosen == "reference":
        return gather_tokens_reference(x, index, pad_value)
    if chosen == "native":
        return torch.ops.glimpse._gather_tokens_native(x, index, pad_value)
    return SPEC.triton_module().gather_tokens_triton(x, index, pad_value)


define_op(OP, SCHEMA, _router, _fake)


def gather_tokens(x: Tensor, index: Tensor, pad_value: float | int | bool = 0, backend: str = "auto") -> Tensor:
    """``out[b, t] = x[b, index[b, t]]``, and ``pad_value`` where ``index[b, t] == -1``.

    Args:
        x: [B, S, ...] of any dtype (hidden states, masks, ids). For M-RoPE position ids
            [3, B, S] pass the view ``pos.permute(1, 2, 0)`` and permute the result back.
        index: int64 [B, Lmax] with values in [-1, S), from ``keep_index``.
        pad_value: the value of pad slots (integral for integer and bool x).
        backend: ``auto | reference | native | triton``.

    Returns:
        [B, Lmax, ...] with x's dtype. x is not modified.
    """
    require_tensors(OP, x=x, index=index)
    return torch.ops.glimpse.gather_tokens(x, index, pad_value, backend)
