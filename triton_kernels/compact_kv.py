"""Triton compact_kv: every layer's K and V in one launch.

Tensors are reached through device tables of (pointer, strides) rows, cached by the tensors'
addresses and uploaded from pinned memory without a host sync (a copy CUDA graphs capture;
the cache keeps the pinned source alive for replays). Each program copies a tile of kept rows
of one (tensor, b, head): full-width loads and stores along D, pad slots written as zeros.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._utils import device_guard, next_pow2, triton_interpreting, warp_options

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}
_TABLES: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 64
_CAPTURED_TABLES: dict = {}  # tables uploaded while a CUDA graph was captured: kept for good


def _table_rows(tensors: list[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)) for t in tensors)


def _device_table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """int64 [n, 4] on the tensors' device: data pointer and (b, head, seq) strides of each.

    Cached by the rows' values. The upload is a non-blocking copy from pinned memory (no host
    sync, so CUDA graphs capture it); the cache keeps the pinned source alive, because a
    replayed graph copies from it again. Tables made during a capture are never evicted.
    """
    rows = _table_rows(tensors)
    key = (tensors[0].device, rows)
    entry = _CAPTURED_TABLES.get(key) or _TABLES.get(key)
    if entry is not None:
        if key in _TABLES:
            _TABLES.move_to_end(key)
        return entry[1]
    host = torch.tensor(rows, dtype=torch.int64)
    if tensors[0].device.type != "cuda":
        entry = (host, host)
    else:
        host = host.pin_memory()
        entry = (host, host.to(tensors[0].device, non_blocking=True))
    if tensors[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _CAPTURED_TABLES[key] = entry
    else:
        _TABLES[key] = entry
        if len(_TABLES) > _TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
    return entry[1]


@triton.jit
def _compact_kv_kernel(
    table_ptr,
    out_table_ptr,
    index_ptr,
    B,
    Hkv,
    L,
    D,
    DTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
        mask=(source[:, None] >= 0) & in_d,
        other=0.0,
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
        BLOCK_T = max(1, min(256 if triton_interpreting() else 64, 8192 // BLOCK_D))
        with device_guard(index):
            _compact_kv_kernel[(len(sources) * B * Hkv, triton.cdiv(L, BLOCK_T))](
                _device_table(sources),
                _device_table(outputs),
                index.contiguous(),
                B,
                Hkv,
                L,
                D,
                DTYPE=_TL_DTYPES[sources[0].dtype],
                BLOCK_T=BLOCK_T,
                BLOCK_D=BLOCK_D,
                **warp_options(BLOCK_T * BLOCK_D),
            )
    return list(out_keys), list(out_values)
