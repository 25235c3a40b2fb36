"""``glimpse.gather_tokens``: gather tokens of x along dim 1 by an index with -1 pads."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, declare_backends
from ..reference import gather_tokens_reference
from ._define import Call, define_native, define_op, require_tensors, run_kernel

OP = "gather_tokens"
SPEC = declare_backends(OpBackends(OP, native=("cpu",), triton="gather_tokens"))
SCHEMA = "(Tensor x, Tensor index, Scalar pad_value=0, str backend='auto') -> Tensor"
Scalar = float | int | bool


class Kernel(NamedTuple):
    """What the native and Triton kernels take."""

    x: Tensor
    index: Tensor
    pad_value: Scalar


def validate(c: Call) -> None:
    v.check_tensor(OP, "x", c.x)
    if c.x.dim() < 2:
        v.fail_value(OP, f"x must be [B, S, ...] (at least 2-D), got {v.describe(c.x)}")
    v.check_index(OP, c.index, c.x.shape[0], c.x.shape[1])
    v.check_same_device(OP, {"x": c.x, "index": c.index})
    if not isinstance(c.pad_value, (bool, int, float)):
        v.fail_type(OP, f"pad_value must be a bool, int or float, got {type(c.pad_value).__name__}")
    exact = c.x.dtype == torch.bool or not (c.x.is_floating_point() or c.x.is_complex())
    if exact and isinstance(c.pad_value, float) and not c.pad_value.is_integer():
        v.fail_type(OP, f"pad_value must be integral for {v.dtype_name(c.x.dtype)} x, got {c.pad_value}")
    v.check_backend(OP, c.backend)


def _fake(c: Call) -> Tensor:
    validate(c)
    return c.x.new_empty((c.x.shape[0], c.index.shape[1], *c.x.shape[2:]))


def _router(c: Call) -> Tensor:
    validate(c)
    chosen = SPEC.resolve(c.backend, c.x.device)
    if chosen == "reference":
        return gather_tokens_reference(c.x, c.index, c.pad_value)
    return run_kernel(SPEC, chosen, Kernel(c.x, c.index, c.pad_value))


define_op(OP, SCHEMA, _router, _fake)
define_native(OP, Kernel, "Tensor")


def gather_tokens(x: Tensor, index: Tensor, *, pad_value: float | int | bool = 0, backend: str = "auto") -> Tensor:
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
