"""``glimpse.compact_kv_paged``: compact pruned requests' K/V in place inside a paged cache.

A serving engine (vLLM) keeps each layer's K/V in a paged cache; after a prune, request p's
kept rows ``index[p, :L_p]`` move to its first ``L_p`` rows, where the engine's attention then
reads them (``seq_len = L_p``) and the blocks past ``ceil(L_p / block_size)`` can be freed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _validation as v
from .._backend import OpBackends, declare_backends
from ..reference import compact_kv_paged_reference
from ._define import Call, define_native, define_op, require_tensors, run_kernel

OP = "compact_kv_paged"
SPEC = declare_backends(OpBackends(OP, native=("cpu",), triton="compact_kv_paged"))
SCHEMA = "(Tensor(a!)[] caches, Tensor block_table, Tensor index, str backend='auto') -> ()"
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
CACHE_SHAPE = "[num_blocks, Hkv, block_size, C]"


class Kernel(NamedTuple):
    """What the native and Triton kernels take (caches written in place)."""

    caches: list[Tensor]
    block_table: Tensor
    index: Tensor


def _check_caches(caches: list[Tensor]) -> None:
    first = caches[0]
    for i, cache in enumerate(caches):
        name = f"caches[{i}]"
        v.check_tensor(OP, name, cache)
        v.check_dtype(OP, name, cache, CACHE_DTYPES, CACHE_SHAPE)
        v.check_rank(OP, name, cache, 4, CACHE_SHAPE)
        if cache.stride(3) != 1:
            v.fail_value(OP, f"{name} must have a contiguous last (content) axis, got strides {tuple(cache.stride())}")
        if cache.dtype != first.dtype:
            v.fail_type(
                OP, f"{name} must have the dtype of caches[0] ({v.dtype_name(first.dtype)}), got {v.describe(cache)}"
            )
        if cache.shape != first.shape or cache.stride() != first.stride() or cache.device != first.device:
            v.fail_value(OP, f"{name} must have the shape, strides and device of caches[0] ({v.describe(first)}, "
                             f"strides {tuple(first.stride())}), got {v.describe(cache)}, "
                             f"strides {tuple(cache.stride())}")  # fmt: skip


def _check_rows(block_table: Tensor, index: Tensor, num_blocks: int, block_size: int) -> None:
    """On CPU tensors: each index row is strictly ascending kept positions followed by -1
    pads, and the blocks a row touches are distinct, allocated block ids that no other row
    touches (so the programs of different rows never write the same memory)."""
    valid = index >= 0
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        v.fail_value(OP, "index rows must hold the kept positions first and -1 pads after them")
    steps = index[:, 1:] - index[:, :-1]
    if bool(((steps <= 0) & valid[:, 1:]).any()):
        v.fail_value(OP, "index rows must be strictly ascending (kept positions in order)")
    lengths = valid.sum(dim=1)
    highest = torch.where(lengths > 0, index.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0], -1)
    blocks_used = torch.div(highest, block_size, rounding_mode="floor") + 1  # the blocks row p reads and writes
    used = torch.arange(block_table.shape[1])[None, :] < blocks_used[:, None]
    ids = block_table[used].long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        v.fail_value(
            OP, f"block_table entries of the blocks a row uses must be in [0, num_blocks={num_blocks}), got {bad}"
        )
    if ids.numel() != torch.unique(ids).numel():
        v.fail_value(OP, "block_table rows must not share blocks (each block is moved by one row's program)")


def validate(c: Call) -> None:
    v.check_backend(OP, c.backend)
    v.check_tensor(OP, "block_table", c.block_table)
    v.check_tensor(OP, "index", c.index)
    if c.block_table.dtype != torch.int32 or c.block_table.dim() != 2:
        v.fail_type(OP, f"block_table must be int32 [P, max_blocks], got {v.describe(c.block_table)}")
    if c.index.dtype != torch.int64 or c.index.dim() != 2:
        v.fail_type(OP, f"index must be int64 [P, Lmax], got {v.describe(c.index)}")
    if c.index.shape[0] != c.block_table.shape[0]:
        v.fail_value(OP, f"index must have one row per block_table row ({c.block_table.shape[0]}), "
                         f"got {v.describe(c.index)}")  # fmt: skip
    if not c.caches:
        return
    _check_caches(c.caches)
    num_blocks, _, block_size, _ = c.caches[0].shape
    v.check_same_device(OP, {"caches[0]": c.caches[0], "block_table": c.block_table, "index": c.index})
    capacity = c.block_table.shape[1] * block_size
    if c.index.shape[1] > capacity:
        v.fail_value(OP, f"index must have at most max_blocks * block_size = {capacity} columns, "
                         f"got {v.describe(c.index)}")  # fmt: skip
    if v.reads_data_cheaply(c.index) and c.index.numel() > 0:
        low, high = int(c.index.min()), int(c.index.max())
        if low < -1 or high >= capacity:
            v.fail_value(OP, f"index values must be in [-1, max_blocks * block_size) = [-1, {capacity}), "
                             f"got {low if low < -1 else high}")  # fmt: skip
        if v.reads_data_cheaply(c.block_table):
            _check_rows(c.block_table, c.index, num_blocks, block_size)


def _fake(c: Call) -> None:
    validate(c)


def _router(c: Call) -> None:
    validate(c)
    if not c.caches or c.index.numel() == 0:
        return
    chosen = SPEC.resolve(c.backend, c.index.device)
    if chosen == "reference":
        compact_kv_paged_reference(list(c.caches), c.block_table, c.index)
        return
    caches = [t.view(torch.uint8) if t.dtype.is_floating_point and t.element_size() == 1 else t for t in c.caches]
    run_kernel(SPEC, chosen, Kernel(caches, c.block_table.contiguous(), c.index.contiguous()))


define_op(OP, SCHEMA, _router, _fake)
define_native(OP, Kernel, "()", mutated=("caches",))


def compact_kv_paged(caches: list[Tensor], block_table: Tensor, index: Tensor, *, backend: str = "auto") -> None:
    """Move each pruned request's kept K/V rows to its first rows, in place, in every layer's
    paged cache.

    Args:
        caches: one paged cache per layer, each [num_blocks, Hkv, block_size, C] with the
            content axis C contiguous (vLLM's per-layer view: K and V side by side in C, any
            ``KVCacheLayout`` of the other three axes), all of one shape, strides, dtype
            (fp32/fp16/bf16, or fp8/uint8 moved as bytes) and device, sharing no memory
            with each other. Written in place.
        block_table: int32 [P, max_blocks], the blocks of each request to compact (rows must
            not share blocks; the blocks a row touches must be allocated).
        index: int64 [P, Lmax]: row p's kept positions, strictly ascending, then -1 pads
            (``keep_index(keep, padding_side="right")``); ``L_p`` = its non-pad count.
        backend: ``auto | reference | native | triton``.

    Row i of request p (block ``block_table[p, i // block_size]``, offset ``i %
    block_size``), for i < L_p, gets the row at position ``index[p, i]`` as it was before the
    call; rows from L_p on are left as they are. Race-free by construction: as positions
    ascend, ``index[p, i] >= i``, so a row read is never one written earlier; each kernel
    program owns one (layer, request, head) and walks its rows in ascending tiles, loading a
    whole tile before storing it. Row values are checked on CPU tensors only (a device
    sync otherwise); the kernels skip a block id outside the cache instead of writing there.
    """
    require_tensors(OP, block_table=block_table, index=index)
    if not isinstance(caches, (list, tuple)):
        raise TypeError(f"glimpse.{OP}: caches must be a list of tensors, got {type(caches).__name__}")
    for i, cache in enumerate(caches):
        v.check_tensor(OP, f"caches[{i}]", cache)
    torch.ops.glimpse.compact_kv_paged(list(caches), block_table, index, backend)
