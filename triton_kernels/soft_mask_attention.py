"""Triton soft_mask_attention, FlashAttention-2 style, forward and backward.

P_ij = w_j exp(s_ij - L_i) with L_i = log sum_l w_l exp(s_il) over allowed l: the forward
is an online softmax of s + log w (a key with w = 0 never sets the running max, so a
dominant zero-weight key cannot underflow the others' terms) and saves L
(+inf for a row whose allowed weights sum to 0, which makes every later exp 0). Backward,
with E_ij = exp(s_ij - L_i), delta_i = dO_i . O_i and G_ij = E_ij (dP_ij - delta_i):
dS = w_j G_ij = P_ij (dP_ij - delta_i), dw_j = sum_{h, i} G_ij (never divided by w, so finite
at w = 0). E is capped at exp(E_CAP): s - L exceeds fp32's exp range only on a key with w ~ 0
whose logit dominates the row, where P = w E must be 0 and not 0 * inf (only its dw saturates).
``_bwd_dkdv_kernel``: one program per (b, KV head, key block) loops over the heads of its
group and the query blocks, keeping dK, dV and the per-key weight gradient in registers
(only the sum over KV heads of dw happens outside). ``_bwd_dq_kernel``: one program per
(b, head, query block). No N x N tensor, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_guard, dot_precision, launch_options, next_pow2, target_arch, triton_interpreting

E_CAP: tl.constexpr = tl.constexpr(88.0)


@triton.jit
def _key_bias(km_ptr, b, offs_n, N, skm_b, skm_n, HAS_KEY_MASK: tl.constexpr):
    """fp32 [BLOCK_N]: 0 for keys a row may attend, -inf for padding and keys past N."""
    ok = offs_n < N
    if HAS_KEY_MASK:
        ok = ok & (tl.load(km_ptr + b * skm_b + offs_n * skm_n, mask=offs_n < N, other=0) != 0)
    return tl.where(ok, 0.0, float("-inf"))


@triton.jit
def _load_rows(ptr, b, h, offs_m, N, D, s_b, s_h, s_n, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(
        ptr + b * s_b + h * s_h + offs_m[:, None] * s_n + offs_d[None, :],
        mask=(offs_m[:, None] < N) & (offs_d[None, :] < D),
        other=0.0,
    )


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    w_ptr,
    km_ptr,
    out_ptr,
    lse_ptr,
    H,
    group,
    N,
    D,
    scale,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sw_b,
    sw_n,
    skm_b,
    skm_n,
    CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    kvh = h // group
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, b, h, offs_m, N, D, sq_b, sq_h, sq_n, BLOCK_D)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end = tl.minimum((tl.program_id(1) + 1) * BLOCK_M, N) if CAUSAL else N
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, b, kvh, offs_n, N, D, sk_b, sk_h, sk_n, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s += _key_bias(km_ptr, b, offs_n, N, skm_b, skm_n, HAS_KEY_MASK)[None, :]
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        w = tl.load(w_ptr + b * sw_b + offs_n * sw_n, mask=offs_n < N, other=0.0).to(tl.float32)
        s += tl.log(w)[None, :]  # -inf where w = 0: such a key never sets the running max
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        v = _load_rows(v_ptr, b, kvh, offs_n, N, D, sv_b, sv_h, sv_n, BLOCK_D)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    live = total > 0
    out = tl.where(live[:, None], acc / tl.where(live, total, 1.0)[:, None], 0.0)
    lse = tl.where(live, m + tl.log(tl.where(live, total, 1.0)), float("inf"))
    row = bh.to(tl.int64) * N + offs_m
    tl.store(
        out_ptr + row[:, None] * D + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < N) & (offs_d[None, :] < D),
    )
    tl.store(lse_ptr + row, lse, mask=offs_m < N)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    w_ptr,
    km_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    dw_ptr,
    H,
    Hkv,
    group,
    N,
    D,
    scale,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sw_b,
    sw_n,
    skm_b,
    skm_n,
    CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Works on transposed tiles (keys along rows: s^T = k q^T), so no register tile is
    transposed; the K, V and weight tiles stay in registers for the whole loop."""
    bk = tl.program_id(0)
    b, kvh = bk // Hkv, bk % Hkv
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    w = tl.load(w_ptr + b * sw_b + offs_n * sw_n, mask=n_ok, other=0.0).to(tl.float32)
    bias = _key_bias(km_ptr, b, offs_n, N, skm_b, skm_n, HAS_KEY_MASK)
    k = _load_rows(k_ptr, b, kvh, offs_n, N, D, sk_b, sk_h, sk_n, BLOCK_D)
    v = _load_rows(v_ptr, b, kvh, offs_n, N, D, sv_b, sv_h, sv_n, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dw = tl.zeros((BLOCK_N,), tl.float32)
    first = (tl.program_id(1) * BLOCK_N) // BLOCK_M * BLOCK_M if CAUSAL else 0
    for h in range(kvh * group, (kvh + 1) * group):
        row0 = (b * H + h).to(tl.int64) * N
        for start in range(first, N, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < N
            q_t = tl.load(
                q_ptr + b * sq_b + h * sq_h + offs_m[None, :] * sq_n + offs_d[:, None],
                mask=m_ok[None, :] & (offs_d[:, None] < D),
                other=0.0,
            )  # [BLOCK_D, BLOCK_M]
            do = tl.load(
                do_ptr + (row0 + offs_m)[:, None] * D + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < D),
                other=0.0,
            )
            lse = tl.load(lse_ptr + row0 + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(delta_ptr + row0 + offs_m, mask=m_ok, other=0.0)
            s_t = tl.dot(k, q_t, input_precision=PRECISION) * scale + bias[:, None]  # [BLOCK_N, BLOCK_M]
            if CAUSAL:
                s_t = tl.where(offs_n[:, None] <= offs_m[None, :], s_t, float("-inf"))
            # 0 where not allowed and on rows with lse = +inf; capped: see E_CAP
            e_t = tl.exp(tl.minimum(s_t - lse[None, :], E_CAP))
            p_t = e_t * w[:, None]
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            diff_t = tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :]
            dk += tl.dot((p_t * diff_t).to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)
            dw += tl.sum(e_t * diff_t, axis=1)
    out_rows = bk.to(tl.int64) * N + offs_n  # dk, dv contiguous [B, Hkv, N, D]; dw [B, Hkv, N]
    ok = n_ok[:, None] & (offs_d[None, :] < D)
    tl.store(dk_ptr + out_rows[:, None] * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty), mask=ok)
    tl.store(dv_ptr + out_rows[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + out_rows, dw, mask=n_ok)


@triton.jit
def _bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    w_ptr,
    km_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    H,
    group,
    N,
    D,
    scale,
    sq_b,
    sq_h,
    sq_n,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    sw_b,
    sw_n,
    skm_b,
    skm_n,
    CAUSAL: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    kvh = h // group
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row = bh.to(tl.int64) * N + offs_m
    q = _load_rows(q_ptr, b, h, offs_m, N, D, sq_b, sq_h, sq_n, BLOCK_D)
    do = tl.load(
        do_ptr + row[:, None] * D + offs_d[None, :], mask=(offs_m[:, None] < N) & (offs_d[None, :] < D), other=0.0
    )
    lse = tl.load(lse_ptr + row, mask=offs_m < N, other=float("inf"))
    delta = tl.load(delta_ptr + row, mask=offs_m < N, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end = tl.minimum((tl.program_id(1) + 1) * BLOCK_M, N) if CAUSAL else N
    for start in range(0, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = _load_rows(k_ptr, b, kvh, offs_n, N, D, sk_b, sk_h, sk_n, BLOCK_D)
        v = _load_rows(v_ptr, b, kvh, offs_n, N, D, sv_b, sv_h, sv_n, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s += _key_bias(km_ptr, b, offs_n, N, skm_b, skm_n, HAS_KEY_MASK)[None, :]
        if CAUSAL:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        w = tl.load(w_ptr + b * sw_b + offs_n * sw_n, mask=offs_n < N, other=0.0).to(tl.float32)
        p = tl.exp(tl.minimum(s - lse[:, None], E_CAP)) * w[None, :]
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(
        dq_ptr + row[:, None] * D + offs_d[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < N) & (offs_d[None, :] < D),
    )


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, input class and head-dim bound, for
# Hopper (>= 90) and Ampere: the largest tiles found to compile without register spills on
# sm_90a and sm_80 with Triton 3.6 and 3.9, with some headroom (bench/compile_gate.py checks
# every entry). fp32 inputs use ieee FMA dots, which need far smaller tiles than tensor-core
# dots. Speed is unmeasured: a GPU session tunes these.
_TILES = {
    ("fwd", "half", 32): {90: (128, 64, 8, 3), 80: (64, 64, 4, 3)},
    ("bwd", "half", 32): {90: (32, 32, 8, 3), 80: (32, 32, 8, 3)},
    ("fwd", "half", 64): {90: (128, 64, 8, 3), 80: (64, 64, 4, 3)},
    ("fwd", "half", 128): {90: (128, 64, 8, 3), 80: (64, 64, 8, 3)},
    ("fwd", "half", 256): {90: (64, 32, 8, 3), 80: (32, 32, 4, 3)},
    ("bwd", "half", 64): {90: (64, 32, 8, 2), 80: (64, 32, 8, 2)},
    ("bwd", "half", 128): {90: (64, 32, 8, 2), 80: (64, 32, 8, 2)},
    ("bwd", "half", 256): {90: (32, 32, 8, 2), 80: (32, 32, 8, 2)},
    ("fwd", "fp32", 128): {90: (32, 16, 8, 2), 80: (32, 16, 8, 2)},
    ("fwd", "fp32", 256): {90: (16, 16, 8, 2), 80: (16, 16, 8, 2)},
    ("bwd", "fp32", 128): {90: (16, 16, 8, 1), 80: (16, 16, 8, 1)},
    ("bwd", "fp32", 256): {90: (16, 16, 8, 1), 80: (16, 16, 8, 1)},
}


def _tiles(q: torch.Tensor, backward: bool) -> dict:
    """Launch parameters for q's head dim, dtype and GPU."""
    D = q.shape[-1]
    BLOCK_D = max(16, next_pow2(D))
    if triton_interpreting():
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=BLOCK_D, **launch_options(1))
    kind = "fp32" if q.dtype == torch.float32 else "half"
    bound = next(b for b in (32, 64, 128, 256) if BLOCK_D <= b and (kind == "half" or b > 64))
    by_arch = _TILES[("bwd" if backward else "fwd", kind, bound)]
    block_m, block_n, warps, stages = by_arch[90 if target_arch(q) >= 90 else 80]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=BLOCK_D, **launch_options(warps, stages))


def _prepare(q, k, v, key_weight, key_mask):
    if q.shape[-1] > 256:
        raise ValueError(
            f"glimpse.soft_mask_attention: the triton backend takes head dims up to 256, got {q.shape[-1]}"
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    km = key_mask if key_mask is not None else key_weight
    km_strides = key_mask.stride() if key_mask is not None else (0, 0)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *key_weight.stride(), *km_strides)
    return q, k, v, km, strides


def soft_mask_attention_forward_triton(q, k, v, key_weight, key_mask, causal: bool, scale: float):
    """-> (out [B, H, N, D] in q's dtype, lse fp32 [B, H, N]; +inf on rows with zero weight)."""
    B, H, N, D = q.shape
    q, k, v, km, strides = _prepare(q, k, v, key_weight, key_mask)
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    tiles = _tiles(q, backward=False)
    with device_guard(q):
        _fwd_kernel[(B * H, triton.cdiv(N, tiles["BLOCK_M"]))](
            q,
            k,
            v,
            key_weight,
            km,
            out,
            lse,
            H,
            H // k.shape[1],
            N,
            D,
            scale,
            *strides,
            CAUSAL=causal,
            HAS_KEY_MASK=key_mask is not None,
            PRECISION=dot_precision(q.dtype),
            **tiles,
        )
    return out, lse


def soft_mask_attention_backward_triton(grad_out, q, k, v, key_weight, key_mask, causal: bool, scale: float, out, lse):
    """-> (dq, dk, dv, d key_weight)."""
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    q, k, v, km, strides = _prepare(q, k, v, key_weight, key_mask)
    do = grad_out.to(q.dtype).contiguous()
    delta = (do.float() * out.float()).sum(-1).contiguous()  # delta_i = dO_i . O_i = sum_j P_ij dP_ij
    dq = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, N, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, Hkv, N, D), dtype=v.dtype, device=q.device)
    dw_per_kv_head = torch.empty((B, Hkv, N), dtype=torch.float32, device=q.device)
    flags = dict(
        CAUSAL=causal, HAS_KEY_MASK=key_mask is not None, PRECISION=dot_precision(q.dtype), **_tiles(q, backward=True)
    )
    with device_guard(q):
        _bwd_dkdv_kernel[(B * Hkv, triton.cdiv(N, flags["BLOCK_N"]))](
            q,
            k,
            v,
            key_weight,
            km,
            do,
            lse,
            delta,
            dk,
            dv,
            dw_per_kv_head,
            H,
            Hkv,
            H // Hkv,
            N,
            D,
            scale,
            *strides,
            **flags,
        )
        _bwd_dq_kernel[(B * H, triton.cdiv(N, flags["BLOCK_M"]))](
            q, k, v, key_weight, km, do, lse, delta, dq, H, H // Hkv, N, D, scale, *strides, **flags
        )
    dw = dw_per_kv_head.sum(dim=1).to(key_weight.dtype)
    return dq, dk, dv, dw
