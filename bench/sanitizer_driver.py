"""One small call of every op through its Triton kernels, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitizer_driver.py
    python bench/sanitizer_driver.py --device cpu      # the same calls on CPU (TRITON_INTERPRET=1)

Sizes are odd (S = 577, D = 80, 3 rows with left padding) so that every kernel runs masked
tails; soft-mask attention and glimpse_scores run forward and backward. Every output is
compared with the reference: indices, masks, lengths and copies exactly; probabilities,
column sums and soft-mask outputs and gradients against the fp64 reference with the tolerance
tables of tests/ops (the same rows the tests use for this backend and dtype), so a run that
the sanitizer passes also computed the right thing. fp16 on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"


def _tolerance_tables():
    """The tests' tolerance tables (one source for the driver and the tests)."""
    sys.path[:0] = [str(TESTS), str(TESTS / "ops")]
    import test_attention_column_scores as columns
    import test_glimpse_prune as prune
    import test_glimpse_scores as scores
    import test_soft_mask_attention as soft
    from helpers import assert_close, assert_equal, soft_mask_term_scales, tolerance_for

    return columns, prune, scores, soft, assert_close, assert_equal, soft_mask_term_scales, tolerance_for


def run_all(device: str, S: int = 577) -> list[str]:
    import glimpse_ops as g
    from glimpse_ops import reference as ref

    columns_t, prune_t, scores_t, soft_t, assert_close, assert_equal, term_scales, tolerance_for = _tolerance_tables()
    backend = "triton"
    bd = (backend, device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    B, H, Hkv, D, L = 3, 8, 2, 80, 3
    start, stop = S // 30, S - S // 15  # the visual span
    n_visual = stop - start
    cap = max(1, n_visual // 10)
    max_len = S - n_visual + cap
    done: list[str] = []

    def randn(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    def exact(*tensors):
        return [t.detach().double() for t in tensors]

    def same(name, got, want):
        assert_equal(name, got, want)
        done.append(name)

    key_mask = torch.ones(B, S, dtype=torch.bool, device=device)
    key_mask[1, : min(9, start)] = False  # left padding, before the visual span
    candidates = torch.zeros(B, S, dtype=torch.bool, device=device)
    candidates[:, start:stop] = True
    candidates &= key_mask
    keys = [randn(B, Hkv, S, D) for _ in range(L)]
    values = [randn(B, Hkv, S, D) for _ in range(L)]
    scores = torch.rand(B, S, device=device)

    q = randn(B, H, 4, D, grad=True)
    k = keys[0].detach().requires_grad_(True)
    probs = g.glimpse_scores(q, k, key_mask, normalize="probs", backend=backend)
    want_probs = ref.glimpse_scores_reference(*exact(q, k), key_mask, None, "probs")
    assert_close("glimpse_scores", probs, want_probs, tolerance_for(scores_t.TOLERANCES, bd, dtype)["probs"])
    done.append("glimpse_scores")
    grad = torch.randn_like(probs)
    got_grads = torch.autograd.grad(probs, (q, k), grad)
    leaves = [t.requires_grad_(True) for t in exact(q, k)]
    want_grads = torch.autograd.grad(
        ref.glimpse_scores_reference(*leaves, key_mask, None, "probs"), leaves, grad.double()
    )
    for name, a, b in zip(("dq", "dk"), got_grads, want_grads):  # fp16 inputs: the gradients are fp16
        tolerance = (scores_t.GRAD_TOLERANCE[0], 0.0 if dtype == torch.float32 else 2.0**-10)
        assert_close(f"glimpse_scores {name}", a, b, tolerance, scale=b.abs().max())
    done.append("glimpse_scores backward")

    qa = randn(B, H, S, D)
    columns = g.attention_column_scores(qa, keys[1], key_mask, key_mask, causal=True, backend=backend)
    want_columns = ref.attention_column_scores_reference(*exact(qa, keys[1]), key_mask, key_mask, True, None)
    assert_close("attention_column_scores", columns, want_columns, tolerance_for(columns_t.TOLERANCES, bd, dtype))
    done.append("attention_column_scores")

    keep = g.select_tokens(scores, candidates, max_keep=cap, min_keep=1, backend=backend)
    same("select_tokens", keep, ref.select_tokens_reference(scores, candidates, None, cap, 1))
    index, lengths = g.keep_index(keep, max_len=max_len, backend=backend)
    want_index, want_lengths = ref.keep_index_reference(keep, max_len, "left")
    same("keep_index", index, want_index)
    same("keep_index lengths", lengths, want_lengths)
    hidden = randn(B, S, 96)
    same("gather_tokens", g.gather_tokens(hidden, index, backend=backend), ref.gather_tokens_reference(hidden, index))
    new_k, new_v = g.compact_kv(keys, values, index, backend=backend)
    want_k, want_v = ref.compact_kv_reference(keys, values, index)
    for layer, (a, b) in enumerate(zip(new_k + new_v, want_k + want_v)):
        assert_equal(f"compact_kv {'keys' if layer < L else 'values'}[{layer % L}]", a, b)
    done.append("compact_kv")
    pruned = g.prune_kv(scores, candidates, keys, values, max_keep=cap, min_keep=1, max_len=max_len, backend=backend)
    want = ref.prune_kv_reference(scores, candidates, keys, values, None, cap, 1, max_len, "left")
    for a, b in zip(pruned[0] + pruned[1], want[0] + want[1]):
        assert_equal("prune_kv kv", a, b)
    for name, a, b in zip(("index", "lengths", "keep"), pruned[2:], want[2:]):
        assert_equal(f"prune_kv {name}", a, b)
    done.append("prune_kv")

    glimpse = g.glimpse_prune(
        q.detach(),
        keys,
        values,
        key_mask,
        candidates,
        score_layer=1,
        max_keep=cap,
        min_keep=1,
        max_len=max_len,
        backend=backend,
    )
    want_scores = ref.glimpse_scores_reference(*exact(q, keys[1]), key_mask, None, "probs").mean(dim=(1, 2))
    assert_close("glimpse_prune scores", glimpse[4], want_scores, tolerance_for(prune_t.TOLERANCES, bd, dtype))
    # the selection exactly the contract applied to the scores the op returned (half-precision
    # near-ties may rank differently from the reference's own scores)
    chosen = ref.select_tokens_reference(glimpse[4], candidates, None, cap, 1) & key_mask
    chosen_index, chosen_lengths = ref.keep_index_reference(chosen, max_len, "left")
    assert_equal("glimpse_prune index", glimpse[2], chosen_index)
    assert_equal("glimpse_prune lengths", glimpse[3], chosen_lengths)
    want_k, want_v = ref.compact_kv_reference(keys, values, chosen_index)
    for a, b in zip(glimpse[0] + glimpse[1], want_k + want_v):
        assert_equal("glimpse_prune kv", a, b)
    done.append("glimpse_prune")

    qs, ks, vs = randn(B, H, S, D, grad=True), randn(B, Hkv, S, D, grad=True), randn(B, Hkv, S, D, grad=True)
    w = torch.rand(B, S, device=device, dtype=dtype).requires_grad_(True)
    out = g.soft_mask_attention(qs, ks, vs, w, key_mask, causal=True, backend=backend)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (qs, ks, vs, w), grad))
    inputs = exact(qs, ks, vs, w)
    want = (
        ref.soft_mask_attention_reference(*inputs, key_mask, True),
        *ref.soft_mask_attention_backward_reference(grad.double(), *inputs, key_mask, True, None),
    )
    tolerances = soft_t.tolerances(bd, dtype)
    for name, a, b, terms in zip(soft_t.QUANTITIES, got, want, term_scales(grad, qs, ks, vs, w, key_mask, True)):
        assert_close(f"soft_mask_attention {name}", a, b, tolerances[name], scale=terms)
    done += ["soft_mask_attention", "soft_mask_attention backward"]
    if device == "cuda":
        torch.cuda.synchronize()
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seq", type=int, default=577, help="sequence length S (default 577)")
    args = parser.parse_args(argv)
    done = run_all(args.device, args.seq)
    print(f"sanitizer driver: {len(done)} calls checked on {args.device}: {', '.join(done)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
