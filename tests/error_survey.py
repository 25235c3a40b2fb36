"""The measured numerical error of every backend of the ops with float outputs: where the
tolerance tables of ``tests/ops`` come from.

    python tests/error_survey.py                      # reference and native on CPU
    TRITON_INTERPRET=1 python tests/error_survey.py   # adds the Triton kernels on CPU tensors
    python tests/error_survey.py --device cuda --json errors.json   # a GPU (bench/gpu_check.py)

Every figure compares an op's output on fp32/fp16/bf16 inputs with the fp64 reference of the
*same* (rounded) inputs, so it is the kernel's own error, rounding of its output included.
For each (op, quantity, backend, device, dtype) over every seed and size it prints ``abs``,
max |got - want|, and:

* ``scaled``: max |got - want| / T, what an atol relative to T must cover, where T is the
  magnitude of the terms each entry sums (``helpers.soft_mask_term_scales``: an entry small by
  cancellation carries the rounding error of its large terms) or, for ops without term
  scales, max |want|;
* ``rel``: max |got - want| / |want| over the entries with |want| >= 5% of max |want| (or, for
  ``exact_rel`` quantities such as probabilities, over every entry with |want| > 0: a kernel
  that drops small probabilities shows there).

A tolerance table lists, per (backend, device, dtype), an (atol, rtol) pair above these with
a margin (the test files say which); ``helpers.assert_close(..., scale=T)`` applies atol
relative to T as ``scaled`` measures it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import attention_qkv, dtypes_for, glimpse_qk, left_padding_mask, soft_mask_term_scales  # noqa: E402

from glimpse_ops import attention_column_scores, glimpse_prune, glimpse_scores, soft_mask_attention  # noqa: E402
from glimpse_ops._backend import REGISTRY, triton_interpreting  # noqa: E402
from glimpse_ops.reference import (  # noqa: E402
    attention_column_scores_reference,
    glimpse_scores_reference,
    soft_mask_attention_backward_reference,
    soft_mask_attention_reference,
)

# (name, got, want in fp64, the magnitude of the terms each entry sums or None: max |want|)
Quantity = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]
EXACT_REL = {"probs", "scores", "columns"}  # sums of positive terms: every nonzero entry keeps its relative error
# twice the unit roundoff of each dtype: the rtol that covers rounding an entry to the dtype;
# `scaled` with term scales is what the kernel adds beyond it, relative to T
ROUNDING_RTOL = {
    torch.float32: 2.0**-23,
    torch.float16: 2.0**-10,
    torch.bfloat16: 2.0**-7,
}


def _double(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.double() for t in tensors]


def soft_mask_cases(backend: str, device: str, dtype: torch.dtype, small: bool) -> Iterator[Quantity]:
    sizes = [(67, 4, 1), (130, 7, 1)] + ([] if small else [(577, 4, 2)])
    for seq, heads, kv_heads in [(1, 2, 2)] + sizes:
        for causal in (True, False):
            q, k, v = attention_qkv(2, heads, kv_heads, seq, 64, dtype, device)
            w = torch.rand(2, seq, device=device)
            w[:, 1::3] = 0.0  # key 0 keeps a random nonzero weight: at seq = 1 no row is all zero
            w[:, 2::7] = 1.0
            key_mask = torch.ones(2, seq, dtype=torch.bool, device=device)
            key_mask[1, : seq // 4] = False
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v, w)]
            out = soft_mask_attention(*leaves, key_mask, causal=causal, backend=backend)
            grad = torch.randn_like(out)
            grads = torch.autograd.grad(out, leaves, grad)
            exact = _double(q, k, v, w)
            want = soft_mask_attention_reference(*exact, key_mask, causal)
            want_grads = soft_mask_attention_backward_reference(grad.double(), *exact, key_mask, causal, None)
            scales = soft_mask_term_scales(grad, q, k, v, w, key_mask, causal)
            yield from zip(("out", "dq", "dk", "dv", "dw"), (out, *grads), (want, *want_grads), scales)


def glimpse_scores_cases(backend: str, device: str, dtype: torch.dtype, small: bool) -> Iterator[Quantity]:
    for seq in [577] + ([] if small else [4099]):
        for heads, kv_heads in ((8, 2), (7, 1)):
            q, k = glimpse_qk(3, heads, kv_heads, 2, seq, 64, dtype, device)
            mask = left_padding_mask(3, seq, device)
            for normalize in ("logits", "probs", "log_probs"):
                got = glimpse_scores(q, k, mask, scale=None, normalize=normalize, backend=backend)
                want = glimpse_scores_reference(*_double(q, k), mask, None, normalize)
                yield normalize, got, want, None
    if dtype == torch.float32:  # the gradient tests run fp32 inputs
        q, k = glimpse_qk(2, 6, 2, 3, 1000, 80, dtype, device)
        mask = left_padding_mask(2, 1000, device)
        for normalize in ("logits", "probs", "log_probs"):
            leaves = [t.clone().requires_grad_(True) for t in (q, k)]
            out = glimpse_scores(*leaves, mask, scale=None, normalize=normalize, backend=backend)
            grad = torch.where(torch.isfinite(out), torch.randn_like(out), 0.0)
            got = torch.autograd.grad(out, leaves, grad)
            exact = [t.double().requires_grad_(True) for t in (q, k)]
            ref = glimpse_scores_reference(*exact, mask, None, normalize)
            want = torch.autograd.grad(ref, exact, grad.double())
            yield f"{normalize} dq", got[0], want[0], None
            yield f"{normalize} dk", got[1], want[1], None


def glimpse_prune_cases(backend: str, device: str, dtype: torch.dtype, small: bool) -> Iterator[Quantity]:
    for seq in [577] + ([] if small else [4099]):
        q, k = glimpse_qk(3, 8, 2, 1, seq, 64, dtype, device)
        mask = left_padding_mask(3, seq, device)
        scores = glimpse_prune(q, [k], [k], mask, None, 0, max_keep=seq // 10, backend=backend)[4]
        want = glimpse_scores_reference(*_double(q, k), mask, None, "probs").mean(dim=(1, 2))
        yield "scores", scores, want, None


def column_scores_cases(backend: str, device: str, dtype: torch.dtype, small: bool) -> Iterator[Quantity]:
    for seq, heads, kv_heads in [(129, 8, 2)] + ([(257, 7, 1)] if small else [(577, 8, 2), (1031, 7, 1)]):
        for causal in (True, False):
            q, k, _ = attention_qkv(2, heads, kv_heads, seq, 64, dtype, device)
            query_mask = torch.rand(2, seq, device=device) < 0.3
            key_mask = torch.ones(2, seq, dtype=torch.bool, device=device)
            key_mask[1, : seq // 3] = False
            got = attention_column_scores(q, k, query_mask, key_mask, causal=causal, backend=backend)
            want = attention_column_scores_reference(*_double(q, k), query_mask, key_mask, causal)
            yield "columns", got, want, None


CASES: dict[str, Callable[..., Iterator[Quantity]]] = {
    "soft_mask_attention": soft_mask_cases,
    "glimpse_scores": glimpse_scores_cases,
    "glimpse_prune": glimpse_prune_cases,
    "attention_column_scores": column_scores_cases,
}


def errors(
    name: str, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> tuple[float, float, float]:
    """(abs, scaled, rel) as the module docstring defines them; infinities in the same places
    count as equal."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    same_inf = torch.isinf(got) & torch.isinf(want) & (torch.sign(got) == torch.sign(want))
    if bool((torch.isinf(got) != torch.isinf(want)).any() | torch.isnan(got).any()):
        return float("inf"), float("inf"), float("inf")
    diff = torch.where(same_inf, 0.0, (got - want).abs())
    magnitude = torch.where(same_inf, 0.0, want.abs())
    top = float(magnitude.max()) if magnitude.numel() else 0.0
    floor = 0.0 if name in EXACT_REL else 0.05 * top
    large = magnitude > floor
    rel = float((diff[large] / magnitude[large]).max()) if bool(large.any()) else 0.0
    if scale is not None:
        terms = scale.detach().cpu().double()
        beyond_rounding = (diff - ROUNDING_RTOL[dtype] * magnitude).clamp_min(0.0)
        if bool(((beyond_rounding > 0) & (terms == 0)).any()):
            return float(diff.max()), float("inf"), rel  # an entry that sums nothing must come out exact
        return float(diff.max()), float((beyond_rounding / torch.where(terms > 0, terms, 1.0)).max()), rel
    return float(diff.max()), (float(diff.max()) / top if top > 0 else float(diff.max())), rel


def survey(device: str, seeds: int, ops: list[str]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    interpreted = device == "cpu" and triton_interpreting()
    for op in ops:
        for backend in REGISTRY[op].available(device):
            if interpreted and backend != "triton":
                continue  # the interpreter run adds the Triton rows; the others come from a plain run
            for dtype in dtypes_for(backend, device):
                for seed in range(seeds):
                    torch.manual_seed(seed)
                    for name, got, want, scale in CASES[op](backend, device, dtype, small=interpreted):
                        abs_error, scaled, rel = errors(name, got, want, scale, dtype)
                        key = (op, name, backend, device, str(dtype).removeprefix("torch."))
                        row = rows.setdefault(key, dict(zip(("op", "quantity", "backend", "device", "dtype"), key)))
                        row["abs"] = max(row.get("abs", 0.0), abs_error)
                        row["scaled"] = max(row.get("scaled", 0.0), scaled)
                        row["rel"] = max(row.get("rel", 0.0), rel)
                print(f"  {op} {backend} {device} {dtype} done", file=sys.stderr, flush=True)
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seeds", type=int, default=4, help="seeds per case (default 4)")
    parser.add_argument("--ops", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    rows = survey(args.device, args.seeds, args.ops)
    print(f"{'op':24} {'quantity':14} {'backend':9} {'device':6} {'dtype':9} {'abs':>9} {'scaled':>9} {'rel':>9}")
    for r in rows:
        print(
            f"{r['op']:24} {r['quantity']:14} {r['backend']:9} {r['device']:6} {r['dtype']:9} "
            f"{r['abs']:9.2e} {r['scaled']:9.2e} {r['rel']:9.2e}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if any(r["scaled"] == float("inf") for r in rows):
        sys.exit("error_survey: a backend gave NaN or misplaced infinities (rows with inf above)")


if __name__ == "__main__":
    main()
