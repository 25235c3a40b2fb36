"""Triton keep_index: one program per row, one launch (plus a host read of the longest row
only when max_len is not given). A row longer than max_len keeps its first max_len tokens;
the routers report it (on CPU tensors, where the check costs no device sync)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_guard, row_block, warp_options


@triton.jit
def _keep_index_kernel(keep_ptr, index_ptr, lengths_ptr, S, L, sk_b, sk_s, LEFT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = keep_ptr + b * sk_b
    length = tl.zeros((), tl.int64)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        length += tl.sum((tl.load(row + offs * sk_s, mask=offs < S, other=0) != 0).to(tl.int64), axis=0)
    tl.store(lengths_ptr + b, length)
    # A row longer than L keeps its first L tokens (the launcher reports it).
    offset = tl.maximum(L - length, 0) if LEFT else 0
    out = index_ptr + b * L
    for start in range(0, L, BLOCK):
        slots = start + tl.arange(0, BLOCK)
        is_pad = (slots < offset) if LEFT else (slots >= length)
        tl.store(out + slots, tl.full((BLOCK,), -1, tl.int64), mask=(slots < L) & is_pad)
    seen = tl.zeros((), tl.int64)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        kept = (tl.load(row + offs * sk_s, mask=offs < S, other=0) != 0).to(tl.int64)
        slot = offset + seen + tl.cumsum(kept, axis=0) - 1
        seen += tl.sum(kept, axis=0)
        tl.store(out + slot, offs.to(tl.int64), mask=(kept != 0) & (slot < L))


def keep_index_triton(keep, max_len: int | None, left_padding: bool):
    """keep bool [B, S] -> (index int64 [B, Lmax], lengths int64 [B])."""
    B, S = keep.shape
    if max_len is None:
        max_len = max(int(keep.sum(dim=1).max()), 0)  # the one host sync of this path
    index = torch.empty((B, max_len), dtype=torch.int64, device=keep.device)
    lengths = torch.empty((B,), dtype=torch.int64, device=keep.device)
    block = row_block(max(S, max_len), 2048)
    with device_guard(keep):
        _keep_index_kernel[(B,)](
            keep, index, lengths, S, max_len, *keep.stride(), LEFT=left_padding, BLOCK=block, **warp_options(block)
        )
    return index, lengths
