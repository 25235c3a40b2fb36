"""The launches the static compile gate (bench/compile_gate.py) makes: every Triton launcher at
the geometries of real models, plus sweeps that make the launchers pick every block size.

Coverage, not a product of every option: each real model runs each launcher once per dtype
with its heaviest flags (so every tile shape a model implies compiles), the Qwen2.5-VL-7B
geometry runs every flag combination (modes, masks, causal, padding side; B = 1 and 8), a
sequence-length sweep makes the row kernels pick each block size, and a head-dim sweep each
BLOCK_D. Tensors are CPU tensors from ``torch.empty`` (the stub driver launches nothing, so
contents never matter); only shapes, strides, dtypes and flags reach the compiler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Model:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int


MODELS = (
    Model("qwen2.5-vl-3b", 16, 2, 128, 2048),
    Model("qwen2.5-vl-7b", 28, 4, 128, 3584),
    Model("qwen2.5-vl-72b", 64, 8, 128, 8192),
    Model("llava-1.5-7b", 32, 32, 128, 4096),
    Model("internvl2-1b", 14, 2, 64, 896),  # Qwen2-0.5B LM: head dim 64
    Model("bunny-3b", 32, 32, 80, 2560),  # Phi-2 LM: head dim 80
)
BASE = MODELS[1]
VISUAL, TEXT = 16384, 256
SEQ = VISUAL + TEXT
HALF = (torch.float16, torch.bfloat16)
# Lengths at which row_block() picks 16, 32, ..., 4096 (and S = 1).
ROW_SWEEP = (1, 17, 33, 65, 129, 257, 513, 1025, 2049, 4099)
Case = tuple[str, Callable[[], object]]


def _kernels():
    from glimpse_ops.triton_kernels import (
        attention_column_scores,
        compact_kv,
        compact_kv_paged,
        gather_tokens,
        glimpse_prune,
        glimpse_scores,
        keep_index,
        prune_kv,
        select_tokens,
        soft_mask_attention,
    )

    return dict(
        scores=glimpse_scores,
        columns=attention_column_scores,
        select=select_tokens,
        index=keep_index,
        gather=gather_tokens,
        compact=compact_kv,
        paged=compact_kv_paged,
        prune=prune_kv,
        glimpse_prune=glimpse_prune,
        soft=soft_mask_attention,
    )


def _e(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def scoring_cases(m: Model, dtype: torch.dtype, S: int, B: int, G: int, every_flag: bool) -> list[Case]:
    """glimpse_scores forward + backward; all (mode, mask) pairs or the heaviest one."""
    k = _kernels()["scores"]
    keys, mask = _e(B, m.kv_heads, S, m.head_dim, dtype=dtype), _e(B, S, dtype=torch.bool)
    q = _e(B, m.heads, G, m.head_dim, dtype=dtype)
    flags = [(mode, masked) for mode in (k.LOGITS, k.PROBS, k.LOG_PROBS) for masked in (True, False)]
    cases = []
    for mode, masked in flags if every_flag else [(k.PROBS, True)]:
        key_mask = mask if masked else None

        def fwd_bwd(key_mask=key_mask, mode=mode):
            out = k.glimpse_scores_triton(q, keys, key_mask, 0.1, mode)
            k.glimpse_scores_backward_triton(out, q, keys, key_mask, 0.1, mode, out)

        cases.append(
            (f"glimpse_scores fwd+bwd {m.name} {_name(dtype)} S={S} B={B} G={G} mode={mode} mask={masked}", fwd_bwd)
        )
    return cases


def selection_cases(m: Model, dtype: torch.dtype, S: int, B: int, every_flag: bool) -> list[Case]:
    """select_tokens, keep_index, gather_tokens, compact_kv, prune_kv and glimpse_prune."""
    k = _kernels()
    visual = S - TEXT if S > 2 * TEXT else S
    kept = max(1, visual // 10)
    max_len = S - visual + kept
    scores, cand = _e(B, S), _e(B, S, dtype=torch.bool)
    caps = _e(B, dtype=torch.int64)
    keys = [_e(B, m.kv_heads, S, m.head_dim, dtype=dtype) for _ in range(2)]
    index = _e(B, max_len, dtype=torch.int64)
    tag = f"{m.name} {_name(dtype)} S={S} B={B}"
    cases = []
    for threshold, per_row in [(None, None), (0.5, caps)] + ([(0.5, None), (None, caps)] if every_flag else []):
        cases.append(
            (
                f"select_tokens {tag} threshold={threshold} per_row={per_row is not None}",
                lambda t=threshold, c=per_row: k["select"].select_tokens_triton(scores, cand, t, kept, 1, c),
            )
        )
    for left in (True, False) if every_flag else (True,):
        cases.append(
            (f"keep_index {tag} left={left}", lambda left=left: k["index"].keep_index_triton(cand, max_len, left))
        )
    gathered = [(m.hidden, dtype)] + ([(1, torch.bool), (3, torch.int64)] if every_flag else [])
    for inner, what in gathered:
        x = _e(B, S, dtype=what) if inner == 1 else _e(B, S, inner, dtype=what)
        cases.append(
            (
                f"gather_tokens {tag} inner={inner} {_name(what)}",
                lambda x=x: k["gather"].gather_tokens_triton(x, index, 0),
            )
        )
    if every_flag:
        positions = _e(3, B, S, dtype=torch.int64).permute(1, 2, 0)  # M-RoPE ids through a view
        cases.append(
            (f"gather_tokens {tag} positions view", lambda: k["gather"].gather_tokens_triton(positions, index, 1))
        )
    cases.append((f"compact_kv {tag}", lambda: k["compact"].compact_kv_triton(keys, keys, index)))
    cases.append(
        (
            f"prune_kv {tag}",
            lambda: k["prune"].prune_kv_triton(scores, cand, keys, keys, None, kept, 1, None, max_len, True),
        )
    )
    q = _e(B, m.heads, 8, m.head_dim, dtype=dtype)
    cases.append(
        (
            f"glimpse_prune {tag} G=8",
            lambda: k["glimpse_prune"].glimpse_prune_triton(
                q, keys, keys, cand, cand, 1, 0.1, None, kept, 1, None, max_len, True
            ),
        )
    )
    return cases


PAGED_DTYPES = (torch.bfloat16, torch.float16, torch.uint8, torch.float32)  # uint8: an fp8 cache as bytes


def paged_cases(m: Model, dtype: torch.dtype, layout: str, requests: int = 4, block_size: int = 16) -> list[Case]:
    """compact_kv_paged on per-layer views of one buffer in a vLLM ``KVCacheLayout``
    (physical order of [L, B, H, N, C]), prompts of SEQ tokens kept to TEXT + VISUAL / 10."""
    k = _kernels()
    blocks = requests * (SEQ // block_size) + 1
    sizes = dict(L=2, B=blocks, H=m.kv_heads, N=block_size, C=2 * m.head_dim)
    logical = _e(*[sizes[axis] for axis in layout], dtype=dtype).permute([layout.index(a) for a in "LBHNC"])
    caches = [logical[0], logical[1]]
    table = _e(requests, SEQ // block_size, dtype=torch.int32)
    index = _e(requests, TEXT + VISUAL // 10, dtype=torch.int64)
    return [
        (
            f"compact_kv_paged {m.name} {_name(dtype)} {layout} P={requests} block={block_size}",
            lambda: k["paged"].compact_kv_paged_triton(caches, table, index),
        )
    ]


def attention_cases(m: Model, dtype: torch.dtype, N: int, B: int, every_flag: bool) -> list[Case]:
    """attention_column_scores and soft_mask_attention forward + backward: causal and not,
    with and without masks, or only causal with masks (the heaviest)."""
    k = _kernels()
    q = _e(B, m.heads, N, m.head_dim, dtype=dtype)
    kv = _e(B, m.kv_heads, N, m.head_dim, dtype=dtype)
    weight, mask = _e(B, N, dtype=dtype), _e(B, N, dtype=torch.bool)
    cases = []
    for causal, masked in [(c, mk) for c in (True, False) for mk in (True, False)] if every_flag else [(True, True)]:
        km = mask if masked else None
        tag = f"{m.name} {_name(dtype)} N={N} B={B} causal={causal} masks={masked}"
        cases.append(
            (
                f"attention_column_scores {tag}",
                lambda c=causal, km=km: k["columns"].attention_column_scores_triton(q, kv, km, km, c, 0.1),
            )
        )

        def soft(c=causal, km=km):
            out, lse = k["soft"].soft_mask_attention_forward_triton(q, kv, kv, weight, km, c, 0.1)
            k["soft"].soft_mask_attention_backward_triton(out, q, kv, kv, weight, km, c, 0.1, out, lse)

        cases.append((f"soft_mask_attention fwd+bwd {tag}", soft))
    return cases


def gate_cases(quick: bool = False) -> list[Case]:
    """Quick: the Qwen2.5-VL-7B geometry in bf16 with every flag. Full: see the module doc."""
    cases: list[Case] = []
    for dtype in (torch.bfloat16,) if quick else HALF:
        for B in (1, 8):
            for G in (1, 8):
                cases += scoring_cases(BASE, dtype, SEQ, B, G, every_flag=B == 1)
            cases += selection_cases(BASE, dtype, SEQ, B, every_flag=True)
        cases += attention_cases(BASE, dtype, SEQ, 1, every_flag=True)
    cases += paged_cases(BASE, torch.bfloat16, "LBNHC")
    if quick:
        return cases
    for m in MODELS[:3]:  # Qwen2.5-VL 3B, 7B, 72B: the models the vLLM plugin serves
        for dtype in PAGED_DTYPES:
            for layout in ("LBNHC", "LBHNC"):  # TRITON_ATTN's / FLASH_ATTN's default, CPU_ATTN's and FlashInfer's
                if (m, dtype, layout) != (BASE, torch.bfloat16, "LBNHC"):
                    cases += paged_cases(m, dtype, layout)
    for m in MODELS:
        if m is BASE:
            continue
        for dtype in HALF:
            for G in (1, 8):
                cases += scoring_cases(m, dtype, SEQ, 1, G, every_flag=False)
            cases += selection_cases(m, dtype, SEQ, 1, every_flag=False)
            cases += attention_cases(m, dtype, SEQ, 1, every_flag=False)
    # fp32 inputs (ieee dots) on the base geometry.
    for G in (1, 8):
        cases += scoring_cases(BASE, torch.float32, SEQ, 1, G, every_flag=G == 8)
    cases += selection_cases(BASE, torch.float32, SEQ, 1, every_flag=False)
    cases += attention_cases(BASE, torch.float32, 4099, 1, every_flag=True)
    for dtype in HALF:
        # Every block size the row kernels pick, odd lengths, B > 1.
        for S in ROW_SWEEP:
            cases += scoring_cases(BASE, dtype, S, 2, 1, every_flag=False)
            cases += selection_cases(BASE, dtype, S, 2, every_flag=False)
        cases += attention_cases(BASE, dtype, 577, 2, every_flag=False)
        # Every BLOCK_D the Triton launchers take (head dims up to 256).
        for D in (16, 32, 96, 256):
            wide = Model(f"hd{D}", BASE.heads, BASE.kv_heads, D, BASE.hidden)
            for G in (1, 8):
                cases += scoring_cases(wide, dtype, 4099, 1, G, every_flag=False)
            cases += attention_cases(wide, dtype, 4099, 1, every_flag=False)
            cases += [
                c for c in selection_cases(wide, dtype, 4099, 1, every_flag=False) if c[0].startswith("compact_kv")
            ]
    for D in (16, 32, 96, 256):  # fp32 at every BLOCK_D too
        wide = Model(f"hd{D}", BASE.heads, BASE.kv_heads, D, BASE.hidden)
        cases += scoring_cases(wide, torch.float32, 4099, 1, 8, every_flag=False)
        cases += attention_cases(wide, torch.float32, 4099, 1, every_flag=False)
    return cases
