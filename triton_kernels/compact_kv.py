"""Triton compact_kv: every layer's K and V in one launch.

Tensors are reached through device tables of (pointer, strides) rows. The source table is
cached by the tensors' addresses (a replayed CUDA graph reuses the one built before
capture); the output table is filled in pinned host memory and copied without a sync, a
copy that CUDA graphs capture. Each program copies a tile of kept rows of one (tensor, b,
head): full-width loads and stores along D, pad slots written as zeros.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._utils import device_guard, interpreting, next_pow2, warps_for

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}
_TABLES: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 32


def _table_rows(tensors: list[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)) for t in tensors)


def _upload_table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """int64 [n, 4] (pointer and strides per tensor) on the device, uploaded from pinned
    memory without a host sync (a copy CUDA graphs capture)."""
    host = torch.tensor(_table_rows(tensors), dtype=torch.int64)
    if tensors[0].device.type != "cuda":
        return host
    return host.pin_memory().to(tensors[0].device, non_blocking=True)


def _source_table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """int64 [n, 4]: data pointer and (b, head, seq) strides of every source tensor."""
    rows = _table_rows(tensors)
    key = (tensors[0].device, rows)
    table = _TABLES.get(key)
    if table is None:
        table = _upload_table(tensors)
        _TABLES[key] = table
        if len(_TABLES) > _TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


@triton.jit
def _compact_kv_kernel(
    table_ptr, out_table_ptr, index_ptr, B, Hkv, L, D,
    DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # (tensor, b, head)
    tensor, b, head = pid // (B * Hkv), (pid // Hkv) % B, pid % Hkv
    src = tl.load(table_ptr + tensor * 4).to(tl.pointer_type(DTYPE))
    stride_b = tl.load(table_ptr + tensor * 4 + 1)
    stride_h = tl.load(table_ptr + tensor * 4 + 2)
    stride_s = tl.load(table_ptr + tensor * 4 + 3)
    slots = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    source = tl.load(index_ptr + b * L + slots, mask=slots < L, other=-1)
    in_d = offs_d[None, :] < D
    rows = tl.load(
        src + b * stride_b + head * stride_h + source[:, None] * stride_s + offs_d[None, :],
        mask=(source[:, None] >= 0) & in_d, other=0.0,
    )
    dst = tl.load(out_table_ptr + tensor * 4).to(tl.pointer_type(DTYPE))
    out = dst + ((b * Hkv + head) * L + slots[:, None]) * D + offs_d[None, :]  # contiguous outputs
    tl.store(out, rows, mask=(slots[:, None] < L) & in_d)


def compact_kv_triton(keys, values, index, out_keys=None, out_values=None):
    """Lists of [B, Hkv, S, D] (head dim contiguous) -> new lists of [B, Hkv, Lmax, D].

    ``out_keys`` / ``out_values``: optional caller-provided contiguous [B, Hkv, Lmax, D]
    tensors to write into instead (e.g. a preallocated cache); they are returned.
    """
    if not keys:
        return [], []
    sources = [t if t.stride(-1) == 1 else t.contiguous() for t in list(keys) + list(values)]
    B, Hkv, _, D = sources[0].shape
    L = index.shape[1]
    if out_keys is None:
        out_keys = [torch.empty((B, Hkv, L, D), dtype=t.dtype, device=t.device) for t in keys]
    if out_values is None:
        out_values = [torch.empty((B, Hkv, L, D), dtype=t.dtype, device=t.device) for t in values]
    outputs = list(out_keys) + list(out_values)
    if L > 0:
        BLOCK_D = next_pow2(D)
        BLOCK_T = max(1, min(256 if interpreting() else 64, 8192 // BLOCK_D))
        with device_guard(index):
            _compact_kv_kernel[(len(sources) * B * Hkv, triton.cdiv(L, BLOCK_T))](
                _source_table(sources), _upload_table(outputs), index.contiguous(), B, Hkv, L, D,
                DTYPE=_TL_DTYPES[sources[0].dtype], BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_T * BLOCK_D),
            )
    return list(out_keys), list(out_values)
