"""Small helpers to define an op, its fake and its device router in one place."""

from __future__ import annotations

from collections.abc import Callable

import torch

DEVICE_KEYS = ("CPU", "CUDA")


def define_op(name: str, schema: str, router: Callable, fake: Callable) -> None:
    """Define ``glimpse::<name>`` with ``schema``; route CPU and CUDA calls to ``router``."""
    qualname = f"glimpse::{name}"
    torch.library.define(qualname, schema)
    torch.library.register_fake(qualname)(fake)
    for key in DEVICE_KEYS:
        torch.library.impl(qualname, key)(router)


def split_max_keep(op: str, max_keep: int | torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The wrappers take max_keep as int or int64 [B]; the schema has both slots."""
    if isinstance(max_keep, torch.Tensor):
        return 0, max_keep
    if isinstance(max_keep, bool) or not isinstance(max_keep, int):
        raise TypeError(f"glimpse.{op}: max_keep must be an int or int64 [B], got {type(max_keep).__name__}")
    return max_keep, None


def require_tensors(op: str, **tensors: object) -> None:
    """Wrappers check their tensor arguments first: the dispatcher would raise a
    RuntimeError for a non-tensor, the convention is a TypeError naming the op."""
    from .._validation import check_tensor

    for name, value in tensors.items():
        if isinstance(value, (list, tuple)) and name in ("keys", "values"):
            for i, item in enumerate(value):
                check_tensor(op, f"{name}[{i}]", item)
        else:
            check_tensor(op, name, value)


def score_dtype(t: torch.Tensor) -> torch.dtype:
    """Scores are fp32, or fp64 for fp64 inputs (the reference's gradient-check mode)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def select_max_keep(max_keep: int, max_keep_per_row: torch.Tensor | None) -> int | torch.Tensor:
    return max_keep if max_keep_per_row is None else max_keep_per_row
