"""Launch helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib
import os

import torch

NEG_INF = float("-inf")


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def device_guard(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not be rounded to tf32: the scores are compared exactly-ish."""
    return "ieee" if dtype == torch.float32 else "tf32"


def row_block(n: int, cap: int = 4096) -> int:
    """Block for a loop over a long row: a power of two, at most ``cap``, at least 16."""
    return max(16, min(next_pow2(n), cap))


def warps_for(block_elements: int) -> int:
    if interpreting():
        return 1
    return 4 if block_elements <= 2048 else 8 if block_elements <= 8192 else 16
