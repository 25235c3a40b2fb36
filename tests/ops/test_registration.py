"""Op registration: torch.library.opcheck for every op on every backend, and
torch.compile(fullgraph=True) through the public wrappers."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch
from helpers import DEVICES, backend_device_params

import glimpse_ops as g
from glimpse_ops._backend import HAS_NATIVE
from glimpse_ops.reference import keep_index_reference


def samples(op: str, device: str, requires_grad: bool):
    """(args, kwargs) lists for one op: small shapes, GQA, masks, optional args both ways."""
    rg = dict(device=device, requires_grad=requires_grad)
    B, H, Hkv, S, D = 2, 4, 2, 9, 16
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    mask[1, :3] = False
    scores = torch.rand(B, S, device=device)
    keep = torch.rand(B, S, device=device) < 0.5
    keep[:, 0] = True
    index = keep_index_reference(keep, S, "left")[0]
    keys = [torch.randn(B, Hkv, S, D, device=device) for _ in range(2)]
    values = [torch.randn(B, Hkv, S, D, device=device) for _ in range(2)]
    if op == "glimpse_scores":
        q, k = torch.randn(B, H, 2, D, **rg), torch.randn(B, Hkv, S, D, **rg)
        return [
            ((q, k, mask, None, "probs"), {}),
            ((q, k, None, 0.5, "logits"), {}),
            ((q, k, mask, None, "log_probs"), {}),
        ]
    if op == "attention_column_scores":
        q, k = torch.randn(B, H, S, D, device=device), torch.randn(B, Hkv, S, D, device=device)
        return [((q, k, keep, mask, True, None), {}), ((q, k, None, None, False, 0.3), {})]
    if op == "select_tokens":
        return [
            ((scores, mask, 0.5, 3, 1, None), {}),
            ((scores, None, None, 0, 0, torch.tensor([2, 4], device=device)), {}),
        ]
    if op == "keep_index":
        return [((keep, S, "left"), {}), ((keep, None, "right"), {})]
    if op == "gather_tokens":
        return [((torch.randn(B, S, 5, device=device), index, 0.0), {}), ((keep, index, False), {})]
    if op == "compact_kv":
        return [((keys, values, index), {})]
    if op == "compact_kv_into":
        outs = [torch.empty(B, Hkv, S, D, device=device) for _ in range(4)]
        return [((keys, values, index, outs[:2], outs[2:]), {})]
    if op == "compact_kv_paged":
        caches = [torch.randn(6, Hkv, 4, 2 * D, device=device) for _ in range(2)]
        table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32, device=device)
        kept = torch.tensor([[0, 2, 5, 9, 11], [4, 7, -1, -1, -1]], device=device)
        return [((caches, table, kept), {})]
    if op == "prune_kv":
        return [
            ((scores, mask, keys, values, 0.5, 3, 1, S, "left", None), {}),
            ((scores, None, keys, values, None, 4, 0, None, "right", None), {}),
        ]
    if op == "glimpse_prune":
        q = torch.randn(B, H, 1, D, device=device)
        return [
            ((q, keys, values, mask, keep, 1, None, None, 3, 1, S, "left", None), {}),
            ((q, keys, values, None, None, 0, None, 0.05, 0, 0, None, "right", None), {}),
        ]
    if op == "soft_mask_attention":
        q = torch.randn(B, H, S, D, **rg)
        k, v = torch.randn(B, Hkv, S, D, **rg), torch.randn(B, Hkv, S, D, **rg)
        w = torch.rand(B, S, **rg)
        return [((q, k, v, w, mask, True, None), {}), ((q, k, v, w, None, False, 0.2), {})]
    raise AssertionError(op)


DIFFERENTIABLE = {"glimpse_scores", "soft_mask_attention"}
CASES = [
    pytest.param(op, p.values[0], id=f"{op}-{p.id}", marks=p.marks)
    for op in (*g.OPS, "compact_kv_into")
    for p in backend_device_params("compact_kv" if op == "compact_kv_into" else op)
]


@pytest.mark.parametrize("op,bd", CASES)
def test_opcheck(op, bd, seed):
    backend, device = bd
    for requires_grad in [False, True] if op in DIFFERENTIABLE else [False]:
        for args, kwargs in samples(op, device, requires_grad):
            torch.library.opcheck(getattr(torch.ops.glimpse, op).default, args, {**kwargs, "backend": backend})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP build is Linux-only")
@pytest.mark.skipif(not HAS_NATIVE, reason="no native extension")
@pytest.mark.skipif(
    os.environ.get("OMP_DYNAMIC", "").lower() == "true" or int(os.environ.get("OMP_THREAD_LIMIT", "64")) < 3,
    reason="OpenMP may give a region fewer threads than asked",
)
def test_native_kernels_run_on_every_intra_op_thread():
    """at::parallel_for is a header template: an extension built without OpenMP runs every
    native CPU kernel on one thread while torch.get_num_threads() says otherwise; one built
    against a second OpenMP runtime ignores torch.set_num_threads (it would use its own
    default, the core count: asking for more threads than cores tells the two apart)."""
    wanted = (os.cpu_count() or 1) + 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(wanted)
        assert torch.ops.glimpse._native_parallel_threads() == wanted
        torch.set_num_threads(1)
        assert torch.ops.glimpse._native_parallel_threads() == 1
    finally:
        torch.set_num_threads(before)
    runtimes = {line.split()[-1] for line in open("/proc/self/maps") if re.search(r"lib(gomp|omp|iomp5)[-.]", line)}
    assert len(runtimes) <= 1, f"more than one OpenMP runtime loaded: {sorted(runtimes)}"


def test_every_design_op_is_registered():
    for op in g.OPS:
        assert hasattr(torch.ops.glimpse, op), op
        assert callable(getattr(g, op)), op


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_static_prune_path(device, seed):
    """The max_len path has static shapes: the whole prune compiles as one graph."""
    torch._dynamo.reset()
    B, H, Hkv, S, D = 2, 4, 2, 64, 16
    q = torch.randn(B, H, 1, D, device=device)
    keys = [torch.randn(B, Hkv, S, D, device=device) for _ in range(3)]
    values = [torch.randn(B, Hkv, S, D, device=device) for _ in range(3)]
    hidden = torch.randn(B, S, 32, device=device)
    candidates = torch.zeros(B, S, dtype=torch.bool, device=device)
    candidates[:, 8:56] = True

    def prune(q, keys, values, hidden, candidates):
        probs = g.glimpse_scores(q, keys[1], None, scale=None, normalize="probs")
        scores = probs.mean(dim=(1, 2))
        new_k, new_v, index, lengths, keep = g.prune_kv(
            scores, candidates, keys, values, threshold=None, max_keep=12, min_keep=1, max_len=40, padding_side="left"
        )
        return new_k, new_v, g.gather_tokens(hidden, index, pad_value=0.0), lengths

    eager = prune(q, keys, values, hidden, candidates)
    compiled = torch.compile(prune, fullgraph=True, backend="aot_eager")(q, keys, values, hidden, candidates)
    for a, b in zip(eager[0] + eager[1] + [eager[2], eager[3]], compiled[0] + compiled[1] + [compiled[2], compiled[3]]):
        assert torch.equal(a, b)
    assert compiled[2].shape == (B, 40, 32)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_dynamic_length_and_backward(device, seed):
    """Without max_len the kept length is a data-dependent size; glimpse_scores' backward
    compiles too."""
    torch._dynamo.reset()
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    keep = torch.rand(2, 50, device=device) < 0.3
    keep[:, 0] = True
    x = torch.randn(2, 50, 8, device=device)

    def compact(keep, x):
        index, lengths = g.keep_index(keep, max_len=None, padding_side="right")
        return g.gather_tokens(x, index, pad_value=0.0)

    got = torch.compile(compact, fullgraph=True, backend="aot_eager")(keep, x)
    assert torch.equal(got, compact(keep, x))

    q = torch.randn(2, 4, 1, 16, device=device, requires_grad=True)
    k = torch.randn(2, 2, 50, 16, device=device, requires_grad=True)
    loss_fn = lambda q, k: g.glimpse_scores(q, k, None, scale=None, normalize="log_probs").logsumexp(-1).sum()  # noqa: E731
    compiled_grads = torch.autograd.grad(torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(q, k), (q, k))
    eager_grads = torch.autograd.grad(loss_fn(q, k), (q, k))
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
