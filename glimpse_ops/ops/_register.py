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


def split_max_keep(max_keep: int | torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The wrappers take max_keep as int or int64 [B]; the schema has both slots."""
    if isinstance(max_keep, torch.Tensor):
        return 0, max_keep
    if isinstance(max_keep, bool) or not isinstance(max_keep, int):
        raise TypeError(f"max_keep must be an int or int64 [B] tensor, got {type(max_keep).__name__}")
    return max_keep, None


def select_max_keep(max_keep: int, max_keep_per_row: torch.Tensor | None) -> int | torch.Tensor:
    return max_keep if max_keep_per_row is None else max_keep_per_row
