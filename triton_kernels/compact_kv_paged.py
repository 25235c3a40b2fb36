"""Triton compact_kv_paged: each pruned request's kept rows moved to its first rows, in place,
in every layer's paged cache, in one launch.

One program per (layer, request, kv head) walks the request's rows in ascending tiles of
``BLOCK_T`` rows: it loads the tile's source rows (full C-wide rows: K and V side by side),
waits at a barrier for every thread of the program, then stores them. Why no row is read
after it was overwritten: positions ascend, so ``index[i] >= i``; a later tile reads rows at
or above its own first row, all above every row written so far; inside a tile, a row stored
as destination i may be another lane's source ``index[j]`` (j < i), which the barrier orders
after every load of the tile. Programs of different layers, requests or heads touch disjoint
memory (distinct caches, blocks no two requests share, another head's rows). A block id
outside the cache is skipped, never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_guard, launch_options, next_pow2, triton_interpreting
from .compact_kv import _device_table

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.uint8: tl.uint8}


@triton.jit
def _compact_kv_paged_kernel(
    table_ptr,
    block_table_ptr,
    index_ptr,
    P,
    Hkv,
    L,
    max_blocks,
    num_blocks,
    C,
    block_size,
    DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # (layer, request, head)
    layer, p, head = pid // (P * Hkv), (pid // Hkv) % P, pid % Hkv
    base = tl.load(table_ptr + layer * 4).to(tl.pointer_type(DTYPE)) + head * tl.load(table_ptr + layer * 4 + 2)
    stride_block = tl.load(table_ptr + layer * 4 + 1)
    stride_slot = tl.load(table_ptr + layer * 4 + 3)
    offs_c = tl.arange(0, BLOCK_C)
    in_c = offs_c[None, :] < C
    for start in range(0, L, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        source = tl.load(index_ptr + p * L + rows, mask=rows < L, other=-1)
        moves = (source >= 0) & (source != rows)
        src_block = tl.load(block_table_ptr + p * max_blocks + source // block_size, mask=moves, other=-1)
        dst_block = tl.load(block_table_ptr + p * max_blocks + rows // block_size, mask=moves, other=-1)
        moves = moves & (src_block >= 0) & (src_block < num_blocks) & (dst_block >= 0) & (dst_block < num_blocks)
        src = base + src_block.to(tl.int64)[:, None] * stride_block + (source % block_size)[:, None] * stride_slot
        values = tl.load(src + offs_c[None, :], mask=moves[:, None] & in_c)
        tl.debug_barrier()  # every lane's loads of this tile before any lane's stores
        dst = base + dst_block.to(tl.int64)[:, None] * stride_block + (rows % block_size)[:, None] * stride_slot
        tl.store(dst + offs_c[None, :], values, mask=moves[:, None] & in_c)


def compact_kv_paged_triton(caches, block_table, index):
    """In place: caches, a list of [num_blocks, Hkv, block_size, C] (C contiguous; fp8 viewed
    as uint8 by the router); block_table int32 [P, max_blocks]; index int64 [P, Lmax]."""
    if not caches or index.numel() == 0:
        return
    num_blocks, Hkv, block_size, C = caches[0].shape
    P, L = index.shape
    BLOCK_C = next_pow2(C)
    # 8 elements a thread (a tile of 32 rows x 256 spilled: 64-bit pointers; 16 took 168 registers)
    BLOCK_T = max(1, min(256, 8192 // BLOCK_C) if triton_interpreting() else min(32, 2048 // BLOCK_C))
    with device_guard(index):
        _compact_kv_paged_kernel[(len(caches) * P * Hkv,)](
            _device_table(list(caches)),
            block_table,
            index,
            P,
            Hkv,
            L,
            block_table.shape[1],
            num_blocks,
            C,
            block_size,
            DTYPE=_TL_DTYPES[caches[0].dtype],
            BLOCK_T=BLOCK_T,
            BLOCK_C=BLOCK_C,
            **launch_options(1 if triton_interpreting() else 8),
        )
