"""Triton gather_tokens: each program copies a tile of output tokens x trailing elements."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_guard, next_pow2, triton_interpreting, warp_options


@triton.jit
def _gather_tokens_kernel(
    x_ptr, index_ptr, out_ptr, pad_value, S, L, ROWS, INNER, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr
):
    """Rows are output tokens flattened as b * L + t; ROWS = B * L."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_rows = rows < ROWS
    source = tl.load(index_ptr + rows, mask=in_rows, other=-1)
    # An index outside [0, S) never reads out of bounds: it yields the pad value.
    valid = (source[:, None] >= 0) & (source[:, None] < S) & (offs[None, :] < INNER)
    src_rows = (rows // L) * S + source
    x = tl.load(x_ptr + src_rows[:, None] * INNER + offs[None, :], mask=valid, other=pad_value)
    tl.store(out_ptr + rows[:, None] * INNER + offs[None, :], x, mask=in_rows[:, None] & (offs[None, :] < INNER))


def gather_tokens_triton(x, index, pad_value):
    """x [B, S, ...] (any dtype), index int64 [B, L] -> [B, L, ...]."""
    B, S = x.shape[:2]
    L = index.shape[1]
    out = torch.empty((B, L, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    src = x.contiguous()
    inner = src.numel() // max(B * S, 1)
    if x.dtype == torch.bool:  # gather bytes; the pad becomes 0/1
        src, dst, pad = src.view(torch.uint8), out.view(torch.uint8), int(bool(pad_value))
    else:
        dst = out
        pad = float(pad_value) if x.is_floating_point() else int(pad_value)
    block_i = min(next_pow2(inner), 1024)
    tile = 16384 if triton_interpreting() else 4096
    block_t = max(1, min(tile // block_i, next_pow2(B * L)))
    grid = (triton.cdiv(B * L, block_t), triton.cdiv(inner, block_i))
    with device_guard(x):
        _gather_tokens_kernel[grid](
            src,
            index.contiguous(),
            dst,
            pad,
            S,
            L,
            B * L,
            inner,
            BLOCK_T=block_t,
            BLOCK_I=block_i,
            **warp_options(block_t * block_i),
        )
    return out
