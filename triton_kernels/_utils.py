"""Launch helpers shared by the Triton launchers."""

from __future__ import annotations

import contextlib

import torch

from glimpse_ops._env import triton_interpreting

NEG_INF = float("-inf")


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
    if triton_interpreting():
        return 1
    return 4 if block_elements <= 2048 else 8 if block_elements <= 8192 else 16


def launch_options(num_warps: int, num_stages: int | None = None) -> dict:
    """Triton launch options: warps, pipeline stages, and the register cap a block of that
    many warps can hold (at most 255 per thread). Without an explicit cap, ptxas 13 (Triton
    3.9) sometimes stops far below it and spills a few bytes (seen for sm_80 by
    bench/compile_gate.py); with one it allocates what the kernel needs."""
    if triton_interpreting():
        return {"num_warps": 1}
    options = {"num_warps": num_warps, "maxnreg": min(255, 65536 // (32 * num_warps) // 8 * 8)}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return options


def warp_options(block_elements: int) -> dict:
    """launch_options for a program that handles ``block_elements`` elements at a time."""
    return launch_options(warps_for(block_elements))


_ARCHES: dict = {}


def target_arch(t: torch.Tensor) -> int:
    """Compute capability x10 that Triton compiles for on t's device (90 for sm_90a, 80 for
    sm_80); 0 under the interpreter. Launchers pick tile sizes by it."""
    if triton_interpreting():
        return 0
    from triton.runtime.driver import driver

    key = (id(driver.active), t.device)
    if key not in _ARCHES:
        with device_guard(t):
            arch = driver.active.get_current_target().arch
        _ARCHES[key] = arch if isinstance(arch, int) else 0
    return _ARCHES[key]
