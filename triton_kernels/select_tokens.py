"""Triton select_tokens: one program per row, one launch, no host sync.

Scores map to 32-bit keys that order like docs/DESIGN.md's ranking (-0.0 == 0.0, NaN lowest).
Pass 1 counts candidates and scores above the threshold; if that does not fix the kept
set, a 32-step bitwise search finds the k-th largest key T, and the ties at T are broken
by index with a running prefix count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import device_guard, row_block, warp_options


@triton.jit
def _rank_key(x):
    """int64 in [0, 2^32): larger for higher scores, equal for -0.0 and 0.0, 0 for NaN."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    key = tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)
    return tl.where(x != x, 0, key)


@triton.jit
def _load_block(scores_row, cand_row, start, S, ss_s, sc_s, BLOCK: tl.constexpr):
    """(offsets, candidate flags, rank keys) of one block of a row."""
    offs = start + tl.arange(0, BLOCK)
    cand = tl.load(cand_row + offs * sc_s, mask=offs < S, other=0) != 0
    key = _rank_key(tl.load(scores_row + offs * ss_s, mask=offs < S, other=0.0))
    return offs, cand, key


@triton.jit
def _select_tokens_kernel(
    scores_ptr,
    cand_ptr,
    caps_ptr,
    keep_ptr,
    S,
    threshold,
    max_keep,
    min_keep,
    ss_b,
    ss_s,
    sc_b,
    sc_s,
    HAS_THRESHOLD: tl.constexpr,
    HAS_CAPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    scores_row, cand_row = scores_ptr + b * ss_b, cand_ptr + b * sc_b
    n_cand = tl.zeros((), tl.int64)
    n_above = tl.zeros((), tl.int64)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        cand = tl.load(cand_row + offs * sc_s, mask=offs < S, other=0) != 0
        x = tl.load(scores_row + offs * ss_s, mask=offs < S, other=0.0)
        n_cand += tl.sum(cand.to(tl.int64), axis=0)
        if HAS_THRESHOLD:
            n_above += tl.sum((cand & (x > threshold)).to(tl.int64), axis=0)
    if not HAS_THRESHOLD:
        n_above = n_cand
    cap = tl.load(caps_ptr + b) if HAS_CAPS else max_keep
    n_keep = tl.where(cap > 0, tl.minimum(n_above, cap), n_above)
    n_keep = tl.maximum(n_keep, tl.minimum(min_keep, n_cand))

    # The kept candidates are: key > T, plus the first `ties` (by index) with key == T.
    # Keeping every candidate needs no search: T = -1 is below every key.
    kth = tl.full((), -1, tl.int64)
    ties = tl.zeros((), tl.int64)
    if n_keep < n_cand:
        kth = tl.zeros((), tl.int64)
        for bit in range(31, -1, -1):
            trial = kth | (1 << bit)
            count = tl.zeros((), tl.int64)
            for start in range(0, S, BLOCK):
                _, cand, key = _load_block(scores_row, cand_row, start, S, ss_s, sc_s, BLOCK)
                count += tl.sum((cand & (key >= trial)).to(tl.int64), axis=0)
            kth = tl.where(count >= n_keep, trial, kth)
        greater = tl.zeros((), tl.int64)
        for start in range(0, S, BLOCK):
            _, cand, key = _load_block(scores_row, cand_row, start, S, ss_s, sc_s, BLOCK)
            greater += tl.sum((cand & (key > kth)).to(tl.int64), axis=0)
        ties = n_keep - greater
    seen_ties = tl.zeros((), tl.int64)
    for start in range(0, S, BLOCK):
        offs, cand, key = _load_block(scores_row, cand_row, start, S, ss_s, sc_s, BLOCK)
        tie = (cand & (key == kth)).to(tl.int64)
        tie_rank = seen_ties + tl.cumsum(tie, axis=0) - tie
        seen_ties += tl.sum(tie, axis=0)
        keep = ~cand | (key > kth) | ((tie != 0) & (tie_rank < ties))
        tl.store(keep_ptr + b * S + offs, keep, mask=offs < S)


def select_tokens_triton(scores, candidate_mask, threshold, max_keep: int, min_keep: int, max_keep_per_row):
    """scores fp32 [B, S], candidate_mask bool [B, S] -> keep bool [B, S] (contiguous)."""
    B, S = scores.shape
    keep = torch.empty((B, S), dtype=torch.bool, device=scores.device)
    caps = max_keep_per_row if max_keep_per_row is not None else keep  # unused without HAS_CAPS
    block = row_block(S, 2048)
    # The threshold is compared in fp32, as the reference does.
    thr = float(torch.tensor(threshold, dtype=torch.float32)) if threshold is not None else 0.0
    with device_guard(scores):
        _select_tokens_kernel[(B,)](
            scores,
            candidate_mask,
            caps,
            keep,
            S,
            thr,
            max_keep,
            min_keep,
            *scores.stride(),
            *candidate_mask.stride(),
            HAS_THRESHOLD=threshold is not None,
            HAS_CAPS=max_keep_per_row is not None,
            BLOCK=block,
            **warp_options(block),
        )
    return keep
