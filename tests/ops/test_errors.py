"""Bad inputs: each raises at once with the op, the argument and what was given."""

from __future__ import annotations

import pytest
import torch

import glimpse_ops as g
from glimpse_ops._backend import triton_interpreting

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def t(*shape, dtype=f32):
    if dtype == torch.bool:
        return torch.ones(*shape, dtype=torch.bool)
    if dtype == torch.int64:
        return torch.zeros(*shape, dtype=torch.int64)
    return torch.randn(*shape).to(dtype)


def kv(n=2, shape=(2, 2, 6, 8), dtype=f32):
    return [t(*shape, dtype=dtype) for _ in range(n)], [t(*shape, dtype=dtype) for _ in range(n)]


CASES = [
    # glimpse_scores
    (
        "scores q rank",
        lambda: g.glimpse_scores(t(2, 4, 8), t(2, 2, 6, 8)),
        ValueError,
        r"glimpse.glimpse_scores: q must be \[B, H, G, D\] \(4-D\), got fp32 \[2, 4, 8\]",
    ),
    (
        "scores q int",
        lambda: g.glimpse_scores(t(2, 4, 1, 8, dtype=torch.int64), t(2, 2, 6, 8)),
        TypeError,
        r"glimpse.glimpse_scores: q must be fp32/fp16/bf16/fp64 \[B, H, G, D\], got int64",
    ),
    (
        "scores dtype mix",
        lambda: g.glimpse_scores(t(2, 4, 1, 8), t(2, 2, 6, 8, dtype=f16)),
        TypeError,
        r"glimpse.glimpse_scores: k must have the dtype of q \(fp32\), got fp16 \[2, 2, 6, 8\]",
    ),
    (
        "scores gqa",
        lambda: g.glimpse_scores(t(2, 4, 1, 8), t(2, 3, 6, 8)),
        ValueError,
        r"glimpse.glimpse_scores: k's head count must divide q's \(4\)",
    ),
    (
        "scores head dim",
        lambda: g.glimpse_scores(t(2, 4, 1, 8), t(2, 2, 6, 16)),
        ValueError,
        r"glimpse.glimpse_scores: k must have the head dim of q \(8\)",
    ),
    (
        "scores batch",
        lambda: g.glimpse_scores(t(2, 4, 1, 8), t(3, 2, 6, 8)),
        ValueError,
        r"glimpse.glimpse_scores: k must have the batch size of q \(2\)",
    ),
    (
        "scores mask dtype",
        lambda: g.glimpse_scores(t(2, 4, 1, 8), t(2, 2, 6, 8), t(2, 6)),
        TypeError,
        r"glimpse.glimpse_scores: key_mask must be bool \[B, S\], got fp32 \[2, 6\]",
    ),
    (
        "scores mask shape",
        lambda: g.glimpse_scores(t(2, 4, 1, 8), t(2, 2, 6, 8), t(2, 5, dtype=torch.bool)),
        ValueError,
        r"glimpse.glimpse_scores: key_mask must be bool \[B, S\] = \[2, 6\], got bool \[2, 5\]",
    ),
    (
        "scores normalize",
        lambda: g.glimpse_scores(t(2, 4, 1, 8), t(2, 2, 6, 8), None, scale=None, normalize="softmax"),
        ValueError,
        r"glimpse.glimpse_scores: normalize must be one of logits, probs, log_probs, got 'softmax'",
    ),
    (
        "scores scale nan",
        lambda: g.glimpse_scores(t(2, 4, 1, 8), t(2, 2, 6, 8), None, scale=float("nan")),
        ValueError,
        r"glimpse.glimpse_scores: scale must be a finite float or None, got nan",
    ),
    (
        "scores empty S",
        lambda: g.glimpse_scores(t(2, 4, 1, 8), t(2, 2, 0, 8)),
        ValueError,
        r"glimpse.glimpse_scores: k must be non-empty \[B, Hkv, S, D\], got fp32 \[2, 2, 0, 8\]",
    ),
    (
        "scores backend",
        lambda: g.glimpse_scores(t(2, 4, 1, 8), t(2, 2, 6, 8), backend="cuda"),
        ValueError,
        r"glimpse.glimpse_scores: backend must be one of auto, reference, native, triton, got 'cuda'",
    ),
    (
        "scores native fp64",
        lambda: g.glimpse_scores(
            t(2, 4, 1, 8, dtype=torch.float64), t(2, 2, 6, 8, dtype=torch.float64), backend="native"
        ),
        TypeError,
        r"glimpse.glimpse_scores: backend 'native' takes fp32/fp16/bf16 inputs, got fp64",
    ),
    (
        "scores not tensor",
        lambda: g.glimpse_scores([1.0], t(2, 2, 6, 8)),
        TypeError,
        r"glimpse.glimpse_scores: q must be a Tensor, got list",
    ),
    # attention_column_scores
    (
        "columns seq",
        lambda: g.attention_column_scores(t(2, 4, 6, 8), t(2, 2, 7, 8)),
        ValueError,
        r"glimpse.attention_column_scores: k must have the sequence length of q \(6\), got fp32 \[2, 2, 7, 8\]",
    ),
    (
        "columns query mask",
        lambda: g.attention_column_scores(t(2, 4, 6, 8), t(2, 2, 6, 8), t(2, 6, dtype=torch.int64)),
        TypeError,
        r"glimpse.attention_column_scores: query_mask must be bool \[B, S\], got int64 \[2, 6\]",
    ),
    (
        "columns native fp64",
        lambda: g.attention_column_scores(t(2, 4, 6, 8, dtype=f64), t(2, 2, 6, 8, dtype=f64), backend="native"),
        TypeError,
        r"glimpse.attention_column_scores: backend 'native' takes fp32/fp16/bf16 inputs, got fp64",
    ),
    (
        "soft mask native fp64",
        lambda: g.soft_mask_attention(
            t(1, 2, 5, 8, dtype=f64),
            t(1, 1, 5, 8, dtype=f64),
            t(1, 1, 5, 8, dtype=f64),
            t(1, 5).abs().clamp(0, 1),
            backend="native",
        ),
        TypeError,
        r"glimpse.soft_mask_attention: backend 'native' takes fp32/fp16/bf16 inputs, got fp64",
    ),
    # select_tokens
    (
        "select fp16 scores",
        lambda: g.select_tokens(t(2, 6, dtype=f16)),
        TypeError,
        r"glimpse.select_tokens: scores must be fp32 \[B, S\], got fp16 \[2, 6\]",
    ),
    (
        "select rank",
        lambda: g.select_tokens(t(6)),
        ValueError,
        r"glimpse.select_tokens: scores must be fp32 \[B, S\] \(2-D\), got fp32 \[6\]",
    ),
    (
        "select candidates",
        lambda: g.select_tokens(t(2, 6), t(2, 7, dtype=torch.bool)),
        ValueError,
        r"glimpse.select_tokens: candidate_mask must be bool \[B, S\] = \[2, 6\], got bool \[2, 7\]",
    ),
    (
        "select min_keep",
        lambda: g.select_tokens(t(2, 6), None, threshold=None, max_keep=0, min_keep=-1),
        ValueError,
        r"glimpse.select_tokens: min_keep must be >= 0, got -1",
    ),
    (
        "select threshold nan",
        lambda: g.select_tokens(t(2, 6), None, threshold=float("nan")),
        ValueError,
        r"glimpse.select_tokens: threshold must be a float or None, got nan",
    ),
    (
        "select caps dtype",
        lambda: g.select_tokens(t(2, 6), None, threshold=None, max_keep=torch.tensor([1, 2], dtype=torch.int32)),
        TypeError,
        r"glimpse.select_tokens: max_keep must be an int or int64 \[B\], got int32 \[2\]",
    ),
    (
        "select caps shape",
        lambda: g.select_tokens(t(2, 6), None, threshold=None, max_keep=torch.tensor([1, 2, 3])),
        ValueError,
        r"glimpse.select_tokens: max_keep must be an int or int64 \[B\] = \[2\], got int64 \[3\]",
    ),
    (
        "select caps float",
        lambda: g.select_tokens(t(2, 6), None, threshold=None, max_keep=0.5),
        TypeError,
        r"glimpse.select_tokens: max_keep must be an int or int64 \[B\], got float",
    ),
    (
        "select empty",
        lambda: g.select_tokens(t(0, 6)),
        ValueError,
        r"glimpse.select_tokens: scores must be non-empty fp32 \[B, S\], got fp32 \[0, 6\]",
    ),
    # keep_index
    (
        "index keep dtype",
        lambda: g.keep_index(t(2, 6)),
        TypeError,
        r"glimpse.keep_index: keep must be bool \[B, S\], got fp32 \[2, 6\]",
    ),
    (
        "index max_len",
        lambda: g.keep_index(t(2, 6, dtype=torch.bool), max_len=0),
        ValueError,
        r"glimpse.keep_index: max_len must be >= 1 or None, got 0",
    ),
    (
        "index padding side",
        lambda: g.keep_index(t(2, 6, dtype=torch.bool), max_len=None, padding_side="middle"),
        ValueError,
        r"glimpse.keep_index: padding_side must be one of left, right, got 'middle'",
    ),
    (
        "index overflow",
        lambda: g.keep_index(t(2, 6, dtype=torch.bool), max_len=4),
        ValueError,
        r"glimpse.keep_index: every row must keep at most max_len=4 tokens, got 6 in row 0",
    ),
    # gather_tokens
    (
        "gather index dtype",
        lambda: g.gather_tokens(t(2, 6, 3), torch.zeros(2, 5, dtype=torch.int32)),
        TypeError,
        r"glimpse.gather_tokens: index must be int64 \[B, Lmax\], got int32 \[2, 5\]",
    ),
    (
        "gather index range",
        lambda: g.gather_tokens(t(2, 6, 3), torch.tensor([[0, 6], [1, -1]])),
        ValueError,
        r"glimpse.gather_tokens: index values must be in \[-1, S\) = \[-1, 6\), got 6",
    ),
    (
        "gather index negative",
        lambda: g.gather_tokens(t(2, 6, 3), torch.tensor([[0, -2], [1, -1]])),
        ValueError,
        r"glimpse.gather_tokens: index values must be in \[-1, S\) = \[-1, 6\), got -2",
    ),
    (
        "gather index batch",
        lambda: g.gather_tokens(t(2, 6, 3), torch.zeros(3, 5, dtype=torch.int64)),
        ValueError,
        r"glimpse.gather_tokens: index must be int64 \[B, Lmax\] with B = 2, got int64 \[3, 5\]",
    ),
    (
        "gather x rank",
        lambda: g.gather_tokens(t(6), torch.zeros(1, 5, dtype=torch.int64)),
        ValueError,
        r"glimpse.gather_tokens: x must be \[B, S, ...\] \(at least 2-D\), got fp32 \[6\]",
    ),
    (
        "gather pad int",
        lambda: g.gather_tokens(t(2, 6, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int64), pad_value=0.5),
        TypeError,
        r"glimpse.gather_tokens: pad_value must be integral for int64 x, got 0.5",
    ),
    # compact_kv
    (
        "compact lengths",
        lambda: g.compact_kv(kv(2)[0], kv(1)[1], torch.zeros(2, 3, dtype=torch.int64)),
        ValueError,
        r"glimpse.compact_kv: keys and values must have the same length, got 2 and 1",
    ),
    (
        "compact layer shape",
        lambda: g.compact_kv([t(2, 2, 6, 8), t(2, 2, 5, 8)], kv(2)[1], torch.zeros(2, 3, dtype=torch.int64)),
        ValueError,
        r"glimpse.compact_kv: keys\[1\] must have the shape of keys\[0\] fp32 \[2, 2, 6, 8\], got fp32 \[2, 2, 5, 8\]",
    ),
    (
        "compact layer dtype",
        lambda: g.compact_kv(
            [t(2, 2, 6, 8), t(2, 2, 6, 8, dtype=bf16)], kv(2)[1], torch.zeros(2, 3, dtype=torch.int64)
        ),
        TypeError,
        r"glimpse.compact_kv: keys\[1\] must have the dtype of keys\[0\] \(fp32\), got bf16 \[2, 2, 6, 8\]",
    ),
    (
        "compact rank",
        lambda: g.compact_kv([t(2, 6, 8)], [t(2, 6, 8)], torch.zeros(2, 3, dtype=torch.int64)),
        ValueError,
        r"glimpse.compact_kv: keys\[0\] must be \[B, Hkv, S, D\] \(4-D\), got fp32 \[2, 6, 8\]",
    ),
    (
        "compact index range",
        lambda: g.compact_kv(*kv(2), torch.full((2, 3), 9)),
        ValueError,
        r"glimpse.compact_kv: index values must be in \[-1, S\) = \[-1, 6\), got 9",
    ),
    (
        "compact index shape",
        lambda: g.compact_kv(*kv(2), torch.zeros(6, dtype=torch.int64)),
        ValueError,
        r"glimpse.compact_kv: index must be int64 \[B, Lmax\], got int64 \[6\]",
    ),
    # prune_kv
    (
        "prune kv seq",
        lambda: g.prune_kv(t(2, 7), None, *kv(2)),
        ValueError,
        r"glimpse.prune_kv: keys\[0\] must be \[B, Hkv, S, D\] with B, S = 2, 7 from scores, got fp32 \[2, 2, 6, 8\]",
    ),
    (
        "prune scores dtype",
        lambda: g.prune_kv(t(2, 6, dtype=bf16), None, *kv(2)),
        TypeError,
        r"glimpse.prune_kv: scores must be fp32 \[B, S\], got bf16 \[2, 6\]",
    ),
    (
        "prune max_len",
        lambda: g.prune_kv(t(2, 6), None, *kv(2), max_len=-3),
        ValueError,
        r"glimpse.prune_kv: max_len must be >= 1 or None, got -3",
    ),
    (
        "prune overflow",
        lambda: g.prune_kv(t(2, 6), None, *kv(2), max_len=2),
        ValueError,
        r"glimpse.keep_index: every row must keep at most max_len=2 tokens, got 6 in row 0",
    ),
    # glimpse_prune
    (
        "glimpse_prune layer",
        lambda: g.glimpse_prune(t(2, 4, 1, 8), *kv(2), None, None, 2),
        ValueError,
        r"glimpse.glimpse_prune: score_layer must be in \[0, 2\), got 2",
    ),
    (
        "glimpse_prune empty",
        lambda: g.glimpse_prune(t(2, 4, 1, 8), [], [], None, None, 0),
        ValueError,
        r"glimpse.glimpse_prune: keys must hold at least one layer, got an empty list",
    ),
    (
        "glimpse_prune dtype",
        lambda: g.glimpse_prune(t(2, 4, 1, 8, dtype=f16), *kv(2), None, None, 0),
        TypeError,
        r"glimpse.glimpse_prune: k must have the dtype of q \(fp16\), got fp32 \[2, 2, 6, 8\]",
    ),
    (
        "glimpse_prune candidates",
        lambda: g.glimpse_prune(t(2, 4, 1, 8), *kv(2), None, t(2, 6), 0),
        TypeError,
        r"glimpse.glimpse_prune: candidate_mask must be bool \[B, S\], got fp32 \[2, 6\]",
    ),
    # soft_mask_attention
    (
        "soft weight range",
        lambda: g.soft_mask_attention(t(1, 2, 5, 8), t(1, 1, 5, 8), t(1, 1, 5, 8), torch.full((1, 5), 1.5)),
        ValueError,
        r"glimpse.soft_mask_attention: key_weight values must be in \[0, 1\], got 1.5",
    ),
    (
        "soft weight nan",
        lambda: g.soft_mask_attention(t(1, 2, 5, 8), t(1, 1, 5, 8), t(1, 1, 5, 8), torch.full((1, 5), float("nan"))),
        ValueError,
        r"glimpse.soft_mask_attention: key_weight values must be in \[0, 1\], got nan",
    ),
    (
        "soft weight shape",
        lambda: g.soft_mask_attention(t(1, 2, 5, 8), t(1, 1, 5, 8), t(1, 1, 5, 8), torch.ones(1, 4)),
        ValueError,
        r"glimpse.soft_mask_attention: key_weight must be \[B, N\] = \[1, 5\], got fp32 \[1, 4\]",
    ),
    (
        "soft v shape",
        lambda: g.soft_mask_attention(t(1, 2, 5, 8), t(1, 1, 5, 8), t(1, 2, 5, 8), torch.ones(1, 5)),
        ValueError,
        r"glimpse.soft_mask_attention: v must have the shape of k fp32 \[1, 1, 5, 8\], got fp32 \[1, 2, 5, 8\]",
    ),
    (
        "soft triton on cpu",
        lambda: g.soft_mask_attention(t(1, 2, 5, 8), t(1, 1, 5, 8), t(1, 1, 5, 8), torch.ones(1, 5), backend="triton"),
        RuntimeError,
        r"glimpse.soft_mask_attention: backend 'triton' is not available on cpu",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_raises_clear_error(case, backend):
    name, call, exc_type, pattern = case
    if name == "soft triton on cpu" and triton_interpreting():
        pytest.skip("under TRITON_INTERPRET=1 the triton backend is available on CPU")
    if "backend" in name or "native" in name or "triton" in name:
        if backend == "reference":
            pytest.skip("this case is about the backend argument itself")
    with pytest.raises(exc_type, match=pattern):
        if backend == "auto":
            call()
        else:
            _with_backend(call, backend)


def _with_backend(call, backend):
    """Run ``call`` with every op's default backend forced through GLIMPSE_BACKEND."""
    import os

    os.environ["GLIMPSE_BACKEND"] = backend
    try:
        call()
    finally:
        del os.environ["GLIMPSE_BACKEND"]


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)
    assert len({c[3] for c in CASES}) == len(CASES)


def test_inputs_are_not_modified_by_a_failed_call():
    keys, values = kv(2)
    before = [x.clone() for x in keys + values]
    with pytest.raises(ValueError):
        g.compact_kv(keys, values, torch.full((2, 3), 9))
    assert all(torch.equal(a, b) for a, b in zip(keys + values, before))


def test_auto_skips_triton_for_head_dims_it_does_not_take():
    from glimpse_ops._backend import REGISTRY

    spec = REGISTRY["soft_mask_attention"]
    cuda = torch.device("cuda")  # resolution only: nothing runs
    if spec.unavailable_reason("triton", "cuda") is not None:
        pytest.skip("triton is not installed")
    assert spec.resolve("auto", cuda, torch.bfloat16, 128) == "triton"
    assert spec.resolve("auto", cuda, torch.bfloat16, 512) == "reference"
    assert spec.resolve("auto", cuda, torch.float64, 128) == "reference"
