"""CUDA-only checks (skipped without a GPU; ``bench/gpu_check.py`` runs them on a lent one):
CUDA-graph capture and replay of the no-sync prune paths, and torch.compile with Inductor.
Every op x backend x dtype on CUDA against the reference runs in the per-op test files,
parametrized over devices (``-m cuda`` selects them)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_equal, random_keep_scores

import glimpse_ops as g
from glimpse_ops import reference as ref

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

B, H, HKV, S, D, LAYERS = 3, 8, 2, 577, 128, 4
VISUAL = slice(40, 540)

# (atol, rtol) by the compared tensor's dtype: torch.compile against eager of the same kernels
# (provisional until a GPU run measures the difference; the kernels are the same, so it
# should be rounding of the surrounding Inductor code only)
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (2e-2, 2e-2)}
# glimpse_prune's scores (head-averaged fp32 probabilities) against the reference's: relative
# (see tests/ops/test_glimpse_prune.py's triton-cuda row, provisional)
SCORES_TOLERANCE = (0.0, 3e-5)


def _inputs(dtype: torch.dtype) -> dict:
    candidates = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    candidates[:, VISUAL] = True
    key_mask = torch.ones(B, S, dtype=torch.bool, device="cuda")
    key_mask[0, :7] = False  # left padding in one row
    return dict(
        q=torch.randn(B, H, 1, D, dtype=dtype, device="cuda"),
        keys=[torch.randn(B, HKV, S, D, dtype=dtype, device="cuda") for _ in range(LAYERS)],
        values=[torch.randn(B, HKV, S, D, dtype=dtype, device="cuda") for _ in range(LAYERS)],
        scores=random_keep_scores(B, S, "cuda"),
        candidates=candidates & key_mask,
        key_mask=key_mask,
    )


def _refill(static: dict, fresh: dict) -> None:
    for name, value in fresh.items():
        if isinstance(value, list):
            for dst, src in zip(static[name], value):
                dst.copy_(src)
        else:
            static[name].copy_(value)


def _capture(fn, static: dict):
    """Warm up on a side stream (compiles the kernels), then capture ``fn(static)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static)
    return graph, out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prune_kv_graph_replay(dtype, seed):
    max_keep, max_len = 50, S - 500 + 50
    static = _inputs(dtype)

    def prune(x):
        return g.prune_kv(
            x["scores"],
            x["candidates"],
            x["keys"],
            x["values"],
            max_keep=max_keep,
            min_keep=1,
            max_len=max_len,
            padding_side="left",
            backend="triton",
        )

    graph, out = _capture(prune, static)
    for _ in range(3):  # each replay on new values in the captured buffers
        fresh = _inputs(dtype)
        _refill(static, fresh)
        graph.replay()
        torch.cuda.synchronize()
        want = ref.prune_kv_reference(
            fresh["scores"], fresh["candidates"], fresh["keys"], fresh["values"], None, max_keep, 1, max_len, "left"
        )
        assert_equal("index", out[2], want[2])
        assert_equal("lengths", out[3], want[3])
        for got_t, want_t in zip(out[0] + out[1], want[0] + want[1]):
            assert_equal("compacted kv", got_t, want_t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_glimpse_prune_graph_replay(dtype, seed):
    max_keep, max_len = 37, S - 500 + 37
    static = _inputs(dtype)

    def prune(x):
        return g.glimpse_prune(
            x["q"],
            x["keys"],
            x["values"],
            x["key_mask"],
            x["candidates"],
            score_layer=2,
            max_keep=max_keep,
            min_keep=1,
            max_len=max_len,
            padding_side="left",
            backend="triton",
        )

    graph, out = _capture(prune, static)
    for _ in range(3):
        fresh = _inputs(dtype)
        _refill(static, fresh)
        graph.replay()
        torch.cuda.synchronize()
        want = ref.glimpse_prune_reference(
            fresh["q"],
            fresh["keys"],
            fresh["values"],
            fresh["key_mask"],
            fresh["candidates"],
            2,
            None,
            None,
            max_keep,
            1,
            max_len,
            "left",
        )
        assert_close("scores", out[4], want[4], SCORES_TOLERANCE)
        # Near-equal scores may rank differently from the reference's in half precision, so the
        # selection is checked exactly against the contract applied to the scores this replay
        # returned: a replay that keeps a stale selection (or stale scores) fails here.
        keep = ref.select_tokens_reference(out[4], fresh["candidates"], None, max_keep, 1) & fresh["key_mask"]
        want_index, want_lengths = ref.keep_index_reference(keep, max_len, "left")
        assert_equal("index", out[2], want_index)
        assert_equal("lengths", out[3], want_lengths)
        for got_t, source in zip(out[0] + out[1], fresh["keys"] + fresh["values"]):
            assert_equal("compacted kv", got_t, ref.compact_kv_reference([source], [source], want_index)[0][0])


def test_inductor_compiles_static_prune_path(seed):
    x = _inputs(torch.bfloat16)
    hidden = torch.randn(B, S, 256, dtype=torch.bfloat16, device="cuda")

    def prune(q, keys, values, hidden, candidates):
        scores = g.glimpse_scores(q, keys[1], normalize="probs").mean(dim=(1, 2))
        new_k, new_v, index, lengths, keep = g.prune_kv(
            scores, candidates, keys, values, max_keep=64, min_keep=1, max_len=S - 500 + 64
        )
        return new_k, new_v, g.gather_tokens(hidden, index), lengths

    torch._dynamo.reset()
    eager = prune(x["q"], x["keys"], x["values"], hidden, x["candidates"])
    compiled = torch.compile(prune, fullgraph=True)(x["q"], x["keys"], x["values"], hidden, x["candidates"])
    for a, b in zip(eager[0] + eager[1] + [eager[2], eager[3]], compiled[0] + compiled[1] + [compiled[2], compiled[3]]):
        assert_equal("compiled output", b, a)


def test_soft_mask_attention_inductor_backward(seed):
    q = torch.randn(2, 8, 300, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    k = torch.randn(2, 2, 300, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    v = torch.randn(2, 2, 300, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w = torch.rand(2, 300, device="cuda", requires_grad=True)

    def loss(q, k, v, w):
        return g.soft_mask_attention(q, k, v, w, causal=True).float().square().sum()

    torch._dynamo.reset()
    eager = torch.autograd.grad(loss(q, k, v, w), (q, k, v, w))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v, w), (q, k, v, w))
    for name, a, b in zip("qkvw", compiled, eager):
        assert_close(f"d{name}", a, b, TOLERANCES[b.dtype])
