"""Triton glimpse_scores: a GQA-aware score of G query rows over all keys.

Forward, two launches: ``_glimpse_logits_kernel`` reads each K tile once for every query
row of its KV group (H/Hkv heads x G rows, one ``tl.dot``) and writes masked fp32 logits;
``_row_normalize_kernel`` turns each row into probs / log-probs with an online
log-sum-exp. Backward: ``_row_reduce_kernel`` (per-row sum needed by the softmax
gradient), ``_glimpse_dk_kernel`` (each program owns a key tile: no atomics) and
``_glimpse_dq_kernel`` (each program owns a KV group's query rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_guard, dot_precision, next_pow2, row_block, triton_interpreting, warp_options

LOGITS, PROBS, LOG_PROBS = 0, 1, 2


@triton.jit
def _load_q_rows(
    q_ptr, b, kvh, G, R, D, sq_b, sq_h, sq_g, sq_d, group, d0, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Columns d0 .. d0 + BLOCK_D of the query rows of one KV group, [BLOCK_R, BLOCK_D]
    (row r = head offset r // G, glimpse r % G)."""
    rows = tl.arange(0, BLOCK_R)
    head = kvh * group + rows // G
    offs_d = d0 + tl.arange(0, BLOCK_D)
    ptrs = q_ptr + b * sq_b + head[:, None] * sq_h + (rows % G)[:, None] * sq_g + offs_d[None, :] * sq_d
    return tl.load(ptrs, mask=(rows[:, None] < R) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _glimpse_logits_kernel(
    q_ptr,
    k_ptr,
    mask_ptr,
    out_ptr,
    Hkv,
    G,
    R,
    S,
    D,
    scale,
    sq_b,
    sq_h,
    sq_g,
    sq_d,
    sk_b,
    sk_h,
    sk_s,
    sk_d,
    sm_b,
    sm_s,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DK: tl.constexpr,
):
    """The dot runs over the head dim in BLOCK_DK-wide slices (the whole of it for fp16/bf16;
    narrower for fp32, whose FMA dots would not fit the registers otherwise)."""
    pid = tl.program_id(0)
    b, kvh = pid // Hkv, pid % Hkv
    group = R // G
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    logits = tl.zeros((BLOCK_R, BLOCK_S), tl.float32)
    for d0 in range(0, BLOCK_D, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        q = _load_q_rows(q_ptr, b, kvh, G, R, D, sq_b, sq_h, sq_g, sq_d, group, d0, BLOCK_R, BLOCK_DK)
        k = tl.load(
            k_ptr + b * sk_b + kvh * sk_h + offs_s[:, None] * sk_s + offs_d[None, :] * sk_d,
            mask=s_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        logits += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    logits = logits * scale
    if HAS_MASK:
        valid = tl.load(mask_ptr + b * sm_b + offs_s * sm_s, mask=s_ok, other=0).to(tl.int1)
        logits = tl.where(valid[None, :], logits, float("-inf"))
    rows = tl.arange(0, BLOCK_R)
    # out is contiguous [B, H, G, S]: the group's rows are consecutive.
    out_rows = (b * Hkv + kvh) * R + rows
    tl.store(out_ptr + out_rows[:, None] * S + offs_s[None, :], logits, mask=(rows[:, None] < R) & s_ok[None, :])


@triton.jit
def _row_normalize_kernel(x_ptr, S, MODE: tl.constexpr, BLOCK: tl.constexpr):
    """In place on a contiguous fp32 row of logits: MODE 1 probs, 2 log-probs."""
    row = x_ptr + tl.program_id(0).to(tl.int64) * S
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < S, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    # A row without a valid key: every x is -inf, probs 0 and log-probs -inf follow from lse 0.
    lse = tl.where(m == float("-inf"), 0.0, m + tl.log(total))
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < S, other=float("-inf"))
        y = tl.exp(x - lse) if MODE == 1 else x - lse
        tl.store(row + offs, y, mask=offs < S)


def _key_block(dtype: torch.dtype, half: int) -> int:
    """Keys per tile: ``half`` for fp16/bf16 (tensor-core dots); 16 for fp32, whose ieee dots
    run on FMA units and need far more registers per tile (no spills, by compile_gate)."""
    return 16 if dtype == torch.float32 else half


def _dot_slice(dtype: torch.dtype, block_d: int) -> int:
    """Head-dim columns per dot (and per dq program): up to 128 for fp16/bf16, 32 for fp32
    (wider slices spill registers; bench/compile_gate.py)."""
    return min(block_d, 32 if dtype == torch.float32 else 128)


def _check_supported(q: torch.Tensor) -> None:
    if q.shape[-1] > 256:
        raise ValueError(f"glimpse.glimpse_scores: the triton backend takes head dims up to 256, got {q.shape[-1]}")


def glimpse_scores_triton(q, k, key_mask, scale: float, normalize: int) -> torch.Tensor:
    """q [B, H, G, D], k [B, Hkv, S, D], key_mask bool [B, S] or None -> fp32 [B, H, G, S]."""
    _check_supported(q)
    B, H, G, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    R = (H // Hkv) * G
    out = torch.empty((B, H, G, S), dtype=torch.float32, device=q.device)
    BLOCK_R, BLOCK_D = max(16, next_pow2(R)), max(16, next_pow2(D))
    BLOCK_S = 256 if triton_interpreting() else _key_block(q.dtype, 64 if BLOCK_R * BLOCK_D <= 64 * 128 else 32)
    mask = key_mask if key_mask is not None else out  # unused when HAS_MASK is False
    with device_guard(q):
        _glimpse_logits_kernel[(B * Hkv, triton.cdiv(S, BLOCK_S))](
            q,
            k,
            mask,
            out,
            Hkv,
            G,
            R,
            S,
            D,
            scale,
            *q.stride(),
            *k.stride(),
            *(key_mask.stride() if key_mask is not None else (0, 0)),
            HAS_MASK=key_mask is not None,
            PRECISION=dot_precision(q.dtype),
            BLOCK_R=BLOCK_R,
            BLOCK_S=BLOCK_S,
            BLOCK_D=BLOCK_D,
            BLOCK_DK=_dot_slice(q.dtype, BLOCK_D),
            **warp_options(BLOCK_R * BLOCK_S),
        )
        if normalize != LOGITS:
            block = row_block(S)
            _row_normalize_kernel[(B * H * G,)](out, S, MODE=normalize, BLOCK=block, **warp_options(block))
    return out


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------


@triton.jit
def _row_reduce_kernel(
    g_ptr,
    p_ptr,
    mask_ptr,
    c_ptr,
    S,
    rows_per_batch,
    sm_b,
    sm_s,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """c[row] = sum_j g*p (probs) or sum_j g (log-probs), over valid keys."""
    r = tl.program_id(0).to(tl.int64)
    b = r // rows_per_batch
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < S
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * sm_b + offs * sm_s, mask=offs < S, other=0) != 0)
        g = tl.load(g_ptr + r * S + offs, mask=ok, other=0.0)
        if MODE == 1:
            g = g * tl.load(p_ptr + r * S + offs, mask=ok, other=0.0)
        acc += g
    tl.store(c_ptr + r, tl.sum(acc, axis=0))


@triton.jit
def _ds_tile(
    g_ptr,
    p_ptr,
    c_ptr,
    mask_ptr,
    b,
    kvh,
    R,
    S,
    offs_s,
    sm_b,
    sm_s,
    Hkv,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dL/ds for the group's rows and a key tile, [BLOCK_R, BLOCK_S] fp32 (0 at invalid keys)."""
    rows = tl.arange(0, BLOCK_R)
    row_ids = (b * Hkv + kvh) * R + rows
    ok = (rows[:, None] < R) & (offs_s[None, :] < S)
    if HAS_MASK:
        valid = tl.load(mask_ptr + b * sm_b + offs_s * sm_s, mask=offs_s < S, other=0) != 0
        ok = ok & valid[None, :]
    ptrs = row_ids[:, None].to(tl.int64) * S + offs_s[None, :]
    g = tl.load(g_ptr + ptrs, mask=ok, other=0.0)
    if MODE == 0:
        return g
    c = tl.load(c_ptr + row_ids, mask=rows < R, other=0.0)
    out = tl.load(p_ptr + ptrs, mask=ok, other=float("-inf") if MODE == 2 else 0.0)
    if MODE == 1:
        return tl.where(ok, out * (g - c[:, None]), 0.0)
    return tl.where(ok, g - tl.exp(out) * c[:, None], 0.0)


@triton.jit
def _glimpse_dk_kernel(
    g_ptr,
    p_ptr,
    c_ptr,
    mask_ptr,
    q_ptr,
    dk_ptr,
    Hkv,
    G,
    R,
    S,
    D,
    scale,
    sq_b,
    sq_h,
    sq_g,
    sq_d,
    sm_b,
    sm_s,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b, kvh = pid // Hkv, pid % Hkv
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ds = _ds_tile(g_ptr, p_ptr, c_ptr, mask_ptr, b, kvh, R, S, offs_s, sm_b, sm_s, Hkv, MODE, HAS_MASK, BLOCK_R)
    q = _load_q_rows(q_ptr, b, kvh, G, R, D, sq_b, sq_h, sq_g, sq_d, R // G, 0, BLOCK_R, BLOCK_D).to(tl.float32)
    dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION) * scale
    offs_d = tl.arange(0, BLOCK_D)
    base = (b * Hkv + kvh).to(tl.int64) * S * D  # dk is contiguous [B, Hkv, S, D]
    tl.store(
        dk_ptr + base + offs_s[:, None] * D + offs_d[None, :],
        dk.to(dk_ptr.dtype.element_ty),
        mask=(offs_s[:, None] < S) & (offs_d[None, :] < D),
    )


@triton.jit
def _glimpse_dq_kernel(
    g_ptr,
    p_ptr,
    c_ptr,
    mask_ptr,
    k_ptr,
    dq_ptr,
    Hkv,
    G,
    R,
    S,
    D,
    scale,
    CHUNK,
    ROWS,
    sk_b,
    sk_h,
    sk_s,
    sk_d,
    sm_b,
    sm_s,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (b, KV group, chunk of CHUNK keys, BLOCK_D head-dim columns): that
    chunk's share of dq for the group's rows, fp32, into partial sums [chunks, ROWS = B*H*G, D]
    that the launcher adds."""
    pid = tl.program_id(0)
    b, kvh = pid // Hkv, pid % Hkv
    chunk = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, S), BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        ds = _ds_tile(g_ptr, p_ptr, c_ptr, mask_ptr, b, kvh, R, S, offs_s, sm_b, sm_s, Hkv, MODE, HAS_MASK, BLOCK_R)
        k = tl.load(
            k_ptr + b * sk_b + kvh * sk_h + offs_s[:, None] * sk_s + offs_d[None, :] * sk_d,
            mask=(offs_s[:, None] < S) & (offs_d[None, :] < D),
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(ds, k, input_precision=PRECISION)
    rows = tl.arange(0, BLOCK_R)
    out_rows = chunk.to(tl.int64) * ROWS + (b * Hkv + kvh) * R + rows  # the group's rows are consecutive
    tl.store(
        dq_ptr + out_rows[:, None] * D + offs_d[None, :], acc * scale, mask=(rows[:, None] < R) & (offs_d[None, :] < D)
    )


# Enough (b, group, chunk) programs to fill an H100/H200's 132 SMs twice.
_DQ_PROGRAMS = 264


def glimpse_scores_backward_triton(grad_out, q, k, key_mask, scale: float, normalize: int, out):
    """Gradients of glimpse_scores: (dq like q, dk like k), contiguous.

    dS is kept in fp32 and multiplied on tensor cores in tf32 for fp16/bf16 inputs (ieee
    fp32 for fp32 inputs): probabilities near 1/S fall below fp16's normal range.
    """
    _check_supported(q)
    B, H, G, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    R = (H // Hkv) * G
    grad_out, out = grad_out.contiguous().float(), out.contiguous()
    row_sums = torch.empty((B * H * G,), dtype=torch.float32, device=q.device)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    BLOCK_R, BLOCK_D = max(16, next_pow2(R)), max(16, next_pow2(D))
    BLOCK_S = 256 if triton_interpreting() else _key_block(q.dtype, 32)
    chunks = max(1, min(triton.cdiv(_DQ_PROGRAMS, B * Hkv), triton.cdiv(S, BLOCK_S)))
    chunk = triton.cdiv(triton.cdiv(S, chunks), BLOCK_S) * BLOCK_S
    chunks = triton.cdiv(S, chunk)
    dq_parts = torch.empty((chunks, B * H * G, D), dtype=torch.float32, device=q.device)
    has_mask = key_mask is not None
    mask = key_mask if has_mask else row_sums
    mask_strides = key_mask.stride() if has_mask else (0, 0)
    with device_guard(q):
        if normalize != LOGITS:
            block = row_block(S)
            _row_reduce_kernel[(B * H * G,)](
                grad_out,
                out,
                mask,
                row_sums,
                S,
                H * G,
                *mask_strides,
                MODE=normalize,
                HAS_MASK=has_mask,
                BLOCK=block,
                **warp_options(block),
            )
        common = dict(
            MODE=normalize,
            HAS_MASK=has_mask,
            PRECISION=dot_precision(q.dtype),
            BLOCK_R=BLOCK_R,
            BLOCK_S=BLOCK_S,
            BLOCK_D=BLOCK_D,
            **warp_options(BLOCK_R * BLOCK_D),
        )
        _glimpse_dk_kernel[(B * Hkv, triton.cdiv(S, BLOCK_S))](
            grad_out, out, row_sums, mask, q, dk, Hkv, G, R, S, D, scale, *q.stride(), *mask_strides, **common
        )
        dq_cols = _dot_slice(q.dtype, BLOCK_D)
        _glimpse_dq_kernel[(B * Hkv, chunks, BLOCK_D // dq_cols)](
            grad_out,
            out,
            row_sums,
            mask,
            k,
            dq_parts,
            Hkv,
            G,
            R,
            S,
            D,
            scale,
            chunk,
            B * H * G,
            *k.stride(),
            *mask_strides,
            **{**common, "BLOCK_D": dq_cols, **warp_options(BLOCK_R * dq_cols)},
        )
    dq = dq_parts.sum(dim=0) if chunks > 1 else dq_parts[0]
    return dq.view(B, H, G, D).to(q.dtype), dk
