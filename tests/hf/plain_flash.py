"""FlashAttention's Python interface in plain PyTorch, for running transformers' flash paths on
CPU: ``flash_attn_func`` (padded batch) and ``flash_attn_varlen_func`` (packed sequences by
``cu_seqlens``), both with FlashAttention 2's bottom-right-aligned causal mask and grouped KV
heads. Every call is recorded in ``CALLS`` (the kind and the sequence lengths), so that a test
can see which path transformers took.

It takes fp32 (the tests' tiny models are fp32; transformers keeps fp32 inputs fp32 when the
model's weights are), where the real FlashAttention takes fp16/bf16 only, and refuses dropout
and sliding windows. ``install(monkeypatch)`` makes this module what transformers loads for ``flash_attention_2``
(through its fallback to the ``kernels`` hub kernel ``kernels-community/flash-attn2``, as on a
machine without the ``flash_attn`` package), for ``flash_attention_3`` (the
``flash_attn_interface`` module) and for any hub kernel name a test asks for.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

CALLS: list[tuple[str, list[int], list[int]]] = []  # (kind, query lengths, key lengths)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool) -> torch.Tensor:
    """q [Sq, H, D], k/v [Sk, Hkv, D] -> [Sq, H, D]; the causal mask aligns the last query with
    the last key (FlashAttention >= 2.1)."""
    Sq, Sk = q.shape[0], k.shape[0]
    mask = None
    if causal:
        rows = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
        mask = torch.arange(Sk, device=q.device)[None, :] <= rows
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
    softmax_scale=None, causal=False, window_size=(-1, -1), deterministic=False, return_attn_probs=False,
):  # fmt: skip
    """q [Tq, H, D], k/v [Tk, Hkv, D] packed; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]."""
    if dropout_p or tuple(window_size) != (-1, -1):
        raise NotImplementedError("plain_flash: no dropout or sliding window")
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    q_lengths, k_lengths = [b - a for a, b in zip(cq, cq[1:])], [b - a for a, b in zip(ck, ck[1:])]
    # the real kernel sizes its grid by these and trusts them: they must be the longest sequences
    if max_seqlen_q is not None and int(max_seqlen_q) != max(q_lengths):
        raise ValueError(f"plain_flash: max_seqlen_q {max_seqlen_q} but the longest query is {max(q_lengths)}")
    if max_seqlen_k is not None and int(max_seqlen_k) != max(k_lengths):
        raise ValueError(f"plain_flash: max_seqlen_k {max_seqlen_k} but the longest key run is {max(k_lengths)}")
    CALLS.append(("varlen", q_lengths, k_lengths))
    out = torch.full_like(q, float("nan"))  # rows of no sequence stay NaN
    for i in range(len(cq) - 1):
        q_rows, k_rows = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        out[q_rows] = _attend(q[q_rows], k[k_rows], v[k_rows], softmax_scale, causal)
    return out


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
    return_attn_probs=False,
):  # fmt: skip
    """q [B, Sq, H, D], k/v [B, Sk, Hkv, D], every row a whole sequence."""
    if dropout_p or tuple(window_size) != (-1, -1):
        raise NotImplementedError("plain_flash: no dropout or sliding window")
    CALLS.append(("dense", [q.shape[1]] * q.shape[0], [k.shape[1]] * k.shape[0]))
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def kernel_module(name: str = "plain_flash_kernel") -> types.ModuleType:
    """A module holding the two functions, as a hub kernel or ``flash_attn_interface`` is."""
    module = types.ModuleType(name)
    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def install(monkeypatch) -> None:
    """Route transformers' flash attention loading to this module for the test's duration."""
    import transformers.integrations.hub_kernels as hub_kernels
    import transformers.modeling_flash_attention_utils as flash_utils
    import transformers.modeling_utils as modeling_utils

    kernel = kernel_module()
    monkeypatch.setattr(hub_kernels, "is_kernels_available", lambda: True)
    monkeypatch.setattr(modeling_utils, "is_kernels_available", lambda: True)
    monkeypatch.setattr(hub_kernels, "get_kernel", lambda *args, **kwargs: kernel)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", kernel_module("flash_attn_interface"))
    # the loaded implementation is cached module-wide: start from none, and leave none behind
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    CALLS.clear()
