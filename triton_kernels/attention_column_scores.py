"""Triton attention_column_scores, FlashAttention style (no S x S tensor).

``_row_lse_kernel``: each program owns a block of query rows of one head and streams the
keys it may see, keeping an online log-sum-exp. ``_column_sum_kernel``: each program owns a
block of keys and streams the query rows that may see them, summing exp(s - lse) over the
selected rows in registers: no atomics. GQA reads KV head h // (H / Hkv) directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_guard, dot_precision, launch_options, next_pow2, triton_interpreting


@triton.jit
def _scores_tile(
    q_ptr,
    k_ptr,
    b,
    h,
    kvh,
    offs_m,
    offs_n,
    S,
    D,
    scale,
    sq_b,
    sq_h,
    sq_s,
    sk_b,
    sk_h,
    sk_s,
    km_ptr,
    skm_b,
    skm_s,
    CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Scaled logits [BLOCK_M, BLOCK_N] with -inf where key n is not visible from row m."""
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_s + offs_d[None, :],
        mask=(offs_m[:, None] < S) & (offs_d[None, :] < D),
        other=0.0,
    )
    k = tl.load(
        k_ptr + b * sk_b + kvh * sk_h + offs_n[:, None] * sk_s + offs_d[None, :],
        mask=(offs_n[:, None] < S) & (offs_d[None, :] < D),
        other=0.0,
    )
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    visible = (offs_m[:, None] < S) & (offs_n[None, :] < S)
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    if HAS_KEY_MASK:
        valid = tl.load(km_ptr + b * skm_b + offs_n * skm_s, mask=offs_n < S, other=0) != 0
        visible = visible & valid[None, :]
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _row_lse_kernel(
    q_ptr,
    k_ptr,
    km_ptr,
    lse_ptr,
    H,
    group,
    S,
    D,
    scale,
    sq_b,
    sq_h,
    sq_s,
    sk_b,
    sk_h,
    sk_s,
    skm_b,
    skm_s,
    CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    end = tl.minimum((tl.program_id(1) + 1) * BLOCK_M, S) if CAUSAL else S
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s = _scores_tile(
            q_ptr,
            k_ptr,
            b,
            h,
            h // group,
            offs_m,
            offs_n,
            S,
            D,
            scale,
            sq_b,
            sq_h,
            sq_s,
            sk_b,
            sk_h,
            sk_s,
            km_ptr,
            skm_b,
            skm_s,
            CAUSAL,
            HAS_KEY_MASK,
            PRECISION,
            BLOCK_D,
        )
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(m == float("-inf"), float("inf"), m + tl.log(total))  # +inf: the row sees no key
    tl.store(lse_ptr + bh.to(tl.int64) * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def _column_sum_kernel(
    q_ptr,
    k_ptr,
    km_ptr,
    qm_ptr,
    lse_ptr,
    out_ptr,
    H,
    group,
    S,
    D,
    scale,
    sq_b,
    sq_h,
    sq_s,
    sk_b,
    sk_h,
    sk_s,
    skm_b,
    skm_s,
    sqm_b,
    sqm_s,
    CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    HAS_QUERY_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    first = (tl.program_id(1) * BLOCK_N) // BLOCK_M * BLOCK_M if CAUSAL else 0
    for start in range(first, S, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        s = _scores_tile(
            q_ptr,
            k_ptr,
            b,
            h,
            h // group,
            offs_m,
            offs_n,
            S,
            D,
            scale,
            sq_b,
            sq_h,
            sq_s,
            sk_b,
            sk_h,
            sk_s,
            km_ptr,
            skm_b,
            skm_s,
            CAUSAL,
            HAS_KEY_MASK,
            PRECISION,
            BLOCK_D,
        )
        lse = tl.load(lse_ptr + bh.to(tl.int64) * S + offs_m, mask=offs_m < S, other=float("inf"))
        if HAS_QUERY_MASK:
            chosen = tl.load(qm_ptr + b * sqm_b + offs_m * sqm_s, mask=offs_m < S, other=0) != 0
            lse = tl.where(chosen, lse, float("inf"))
        acc += tl.sum(tl.exp(s - lse[:, None]), axis=0)
    tl.store(out_ptr + bh.to(tl.int64) * S + offs_n, acc, mask=offs_n < S)


def attention_column_scores_triton(q, k, query_mask, key_mask, causal: bool, scale: float) -> torch.Tensor:
    """q [B, H, S, D], k [B, Hkv, S, D] (head dim contiguous) -> fp32 [B, H, S]."""
    B, H, S, D = q.shape
    if D > 256:
        raise ValueError(f"glimpse.attention_column_scores: the triton backend takes head dims up to 256, got {D}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    out = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    # fp32 inputs take ieee dots on FMA units: far more registers per tile (compile_gate).
    block = 128 if triton_interpreting() else 16 if q.dtype == torch.float32 else (64 if D <= 64 else 32)
    BLOCK_D = max(16, next_pow2(D))
    km = key_mask if key_mask is not None else lse
    qm = query_mask if query_mask is not None else lse
    km_strides = key_mask.stride() if key_mask is not None else (0, 0)
    qm_strides = query_mask.stride() if query_mask is not None else (0, 0)
    flags = dict(
        CAUSAL=causal,
        HAS_KEY_MASK=key_mask is not None,
        PRECISION=dot_precision(q.dtype),
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=BLOCK_D,
        **launch_options(8 if q.dtype == torch.float32 and D > 128 else 4),
    )
    grid = (B * H, triton.cdiv(S, block))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    with device_guard(q):
        _row_lse_kernel[grid](q, k, km, lse, H, H // k.shape[1], S, D, scale, *strides, *km_strides, **flags)
        _column_sum_kernel[grid](
            q,
            k,
            km,
            qm,
            lse,
            out,
            H,
            H // k.shape[1],
            S,
            D,
            scale,
            *strides,
            *km_strides,
            *qm_strides,
            HAS_QUERY_MASK=query_mask is not None,
            **flags,
        )
    return out
