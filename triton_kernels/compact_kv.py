"""Triton compact_kv: every layer's K and V in one launch.

The sources are reached through a device table of (pointer, strides) rows, cached by the
tensors' addresses so that a replayed CUDA graph reuses the table built before capture.
The outputs are views into one buffer [2 * layers, B, Hkv, Lmax, D], so the kernel needs
only its base pointer. Each program copies a tile of kept rows of one (tensor, b, head):
full-width loads and stores along D, pad slots written as zeros.
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


def _source_table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """int64 [n, 4]: data pointer and (b, head, seq) strides of every source tensor."""
    rows = tuple((t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)) for t in tensors)
    key = (tensors[0].device, rows)
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(rows, dtype=torch.int64).to(tensors[0].device)
        _TABLES[key] = table
        if len(_TABLES) > _TABLE_CACHE_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


@triton.jit
def _compact_kv_kernel(
    table_ptr, index_ptr, out_ptr, B, Hkv, L, D,
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
    out = out_ptr + (pid * L + slots[:, None]) * D + offs_d[None, :]
    tl.store(out, rows, mask=(slots[:, None] < L) & in_d)


def compact_kv_triton(keys, values, index, out: torch.Tensor | None = None):
    """Lists of [B, Hkv, S, D] (head dim contiguous) -> lists of [B, Hkv, Lmax, D].

    ``out``: optional caller-provided contiguous buffer [2 * layers, B, Hkv, Lmax, D] to
    write into (e.g. a preallocated cache); the returned tensors are its views.
    """
    if not keys:
        return [], []
    sources = [t if t.stride(-1) == 1 else t.contiguous() for t in list(keys) + list(values)]
    n, (B, Hkv, _, D) = len(sources), sources[0].shape
    L = index.shape[1]
    if out is None:
        out = torch.empty((n, B, Hkv, L, D), dtype=sources[0].dtype, device=sources[0].device)
    if L > 0:
        BLOCK_D = next_pow2(D)
        BLOCK_T = max(1, min(256 if interpreting() else 64, 8192 // BLOCK_D))
        with device_guard(index):
            _compact_kv_kernel[(n * B * Hkv, triton.cdiv(L, BLOCK_T))](
                _source_table(sources), index.contiguous(), out, B, Hkv, L, D,
                DTYPE=_TL_DTYPES[sources[0].dtype], BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_T * BLOCK_D),
            )
    parts = list(out.unbind(0))
    return parts[: len(keys)], parts[len(keys) :]
