"""One small call of every op through its Triton kernels, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/sanitizer_driver.py
    python bench/sanitizer_driver.py --device cpu      # the same calls on CPU (TRITON_INTERPRET=1)

Sizes are odd (S = 577, D = 80, 3 rows with left padding) so that every kernel runs masked
tails; soft-mask attention and glimpse_scores run forward and backward. Each output is
compared with the reference, so a run that the sanitizer passes also computed the right thing.
"""

from __future__ import annotations

import argparse
import sys

import torch


def run_all(device: str, S: int = 577) -> list[str]:
    import glimpse_ops as g
    from glimpse_ops import reference as ref

    backend = "triton"
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    B, H, Hkv, D, L = 3, 8, 2, 80, 3
    start, stop = S // 30, S - S // 15  # the visual span
    n_visual = stop - start
    cap = max(1, n_visual // 10)
    max_len = S - n_visual + cap

    def randn(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    key_mask = torch.ones(B, S, dtype=torch.bool, device=device)
    key_mask[1, : min(9, start)] = False  # left padding, before the visual span
    candidates = torch.zeros(B, S, dtype=torch.bool, device=device)
    candidates[:, start:stop] = True
    candidates &= key_mask
    keys = [randn(B, Hkv, S, D) for _ in range(L)]
    values = [randn(B, Hkv, S, D) for _ in range(L)]
    scores = torch.rand(B, S, device=device)
    done = []

    def check(name, got, want, atol=2e-2):
        torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=atol, rtol=2e-2, equal_nan=True)
        done.append(name)

    q = randn(B, H, 4, D, grad=True)
    k = keys[0].detach().requires_grad_(True)
    probs = g.glimpse_scores(q, k, key_mask, normalize="probs", backend=backend)
    check("glimpse_scores", probs, ref.glimpse_scores_reference(q, k, key_mask, None, "probs"))
    probs.sum().backward()
    done.append("glimpse_scores backward")

    qa = randn(B, H, S, D)
    columns = g.attention_column_scores(qa, keys[1], key_mask, key_mask, causal=True, backend=backend)
    check(
        "attention_column_scores",
        columns,
        ref.attention_column_scores_reference(qa, keys[1], key_mask, key_mask, True, None),
        atol=5e-2,
    )

    keep = g.select_tokens(scores, candidates, max_keep=cap, min_keep=1, backend=backend)
    check("select_tokens", keep, ref.select_tokens_reference(scores, candidates, None, cap, 1), atol=0)
    index, lengths = g.keep_index(keep, max_len=max_len, backend=backend)
    check("keep_index", index, ref.keep_index_reference(keep, max_len, "left")[0], atol=0)
    hidden = randn(B, S, 96)
    check("gather_tokens", g.gather_tokens(hidden, index, backend=backend), ref.gather_tokens_reference(hidden, index))
    new_k, _ = g.compact_kv(keys, values, index, backend=backend)
    check("compact_kv", new_k[2], ref.compact_kv_reference(keys, values, index)[0][2], atol=0)
    pruned = g.prune_kv(scores, candidates, keys, values, max_keep=cap, min_keep=1, max_len=max_len, backend=backend)
    check("prune_kv", pruned[2], index, atol=0)
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
    want = ref.glimpse_prune_reference(
        q.detach(), keys, values, key_mask, candidates, 1, None, None, cap, 1, max_len, "left"
    )
    check("glimpse_prune", glimpse[4], want[4])

    qs, ks, vs = randn(B, H, S, D, grad=True), randn(B, Hkv, S, D, grad=True), randn(B, Hkv, S, D, grad=True)
    w = torch.rand(B, S, device=device, dtype=dtype).requires_grad_(True)
    out = g.soft_mask_attention(qs, ks, vs, w, key_mask, causal=True, backend=backend)
    check("soft_mask_attention", out, ref.soft_mask_attention_reference(qs, ks, vs, w, key_mask, True, None))
    out.float().square().sum().backward()
    done.append("soft_mask_attention backward")
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
