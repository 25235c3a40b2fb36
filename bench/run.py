"""The glimpse-ops benchmark: every op against the eager peer pipeline, side by side.

    python bench/run.py            # GPU: the whole registry; CPU: 4k at B=1/8 and 16k at B=1, 7.4% kept
    python bench/run.py --full     # the whole registry on a CPU too (cases too big for the machine are skipped)
    python bench/run.py --smoke    # the 4k-visual-token cases only (under two minutes on a CPU)
    python bench/run.py --e2e      # the reference LVLM end to end, with and without pruning (bench/e2e.py)
    python bench/run.py --e2e --hf # HF Qwen2.5-VL: stock vs our patch vs an eager patch (bench/e2e_hf.py)
    python bench/run.py --e2e --hf --model qwen3_vl   # the same on another family (bench/hf_families.py)
    python bench/run.py --e2e --hf --attn-implementation flash_attention_2   # under FlashAttention
    python bench/run.py --vllm     # serving: stock vLLM vs the glimpse_ops.vllm plugin (bench/serving.py)
    python bench/run.py --vllm --serve   # the same through `vllm serve` and concurrent clients (bench/serving_http.py)
    python bench/run.py --vllm --memory  # peak memory of a 16k-token pruning step vs stock (bench/serving_memory.py)

soft_mask_attention (bench/attention.py) runs forward and forward+backward against SDPA
without a mask (the ceiling), SDPA with a dense log-weight mask requiring grad
(memory-efficient on GPU; on CPU the backend SDPA picks and its math backend),
FlexAttention with a captured log-weight (GPU), and eager PyTorch (CPU: N = 512 and 2048,
fp32; --smoke: 512).

Providers: ``eager`` (the GlimpsePrune/FastV/kvpress-style PyTorch pipeline, see peers.py),
``reference`` (glimpse_ops.reference), ``reference+compile`` (the same under torch.compile),
``native`` (C++/CUDA), ``triton``, ``native_into`` / ``triton_into`` (compact_kv cases:
``compact_kv_into`` writing caches allocated once, as a serving engine's) and ``copy`` (a
device-to-device copy of the same bytes into a buffer allocated once:
the ceiling each row's "% copy" is measured against; every row is timed with the caches
evicted before each call, as a prefill finds its K/V). Every provider's output is checked
against the reference before it is timed; a provider that fails the check gets no time.
``compact_kv_paged`` works in place in a paged cache: each check and each provider's timed
calls get their own copy of the caches, and it has no eager row (its reference is the
PyTorch gather-then-scatter). Results are printed as a
table (time, speed-up over eager, GB/s, % of measured copy bandwidth) and written as JSON
under bench/results/<device>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from attention import attention_cases, attention_providers, run_attention_case  # noqa: E402
from e2e import e2e_cases, print_e2e_table, print_train_table, run_e2e_case, run_train_case, train_cases  # noqa: E402
from registry import COMPACTED_LAYERS, SCORE_LAYER, Case, all_cases, make_inputs  # noqa: E402
from timing import (  # noqa: E402
    copy_bandwidth_gbs,
    gate_failed,
    machine_info,
    measure,
    record_error,
    run_failures,
    spread_text,
)

import glimpse_ops as g  # noqa: E402
from glimpse_ops import reference as ref  # noqa: E402
from glimpse_ops.progress import Progress  # noqa: E402

PROVIDERS = ("eager", "reference", "reference+compile", "native", "triton", "native_into", "triton_into", "copy")
REQUIRED_OP = {
    "glimpse_scores": "glimpse_scores",
    "select_index": "select_tokens",
    "compact_kv": "compact_kv",
    "compact_kv_paged": "compact_kv_paged",
    "prune_kv": "prune_kv",
    "glimpse_prune": "glimpse_prune",
}


def _reference_fn(case: Case) -> Callable[[dict], dict]:
    """The op's reference as a function of the inputs, returning comparable outputs."""
    if case.op == "glimpse_scores":
        return lambda x: {
            "probs": ref.glimpse_scores_reference(x["q"], x["keys"][0], x["key_mask"], x["scale"], "probs")
        }
    if case.op == "select_index":

        def select_index(x):
            keep = ref.select_tokens_reference(x["scores"], x["candidates"], None, case.max_keep, 0)
            return {"index": ref.keep_index_reference(keep, case.max_len, "left")[0]}

        return select_index
    if case.op == "compact_kv":

        def compact(x):
            k, v = ref.compact_kv_reference(x["keys"], x["values"], x["index"])
            return {"kv": k + v}

        return compact
    if case.op == "compact_kv_paged":

        def paged(x):  # in place: gather the kept rows, then scatter them
            ref.compact_kv_paged_reference(x["caches"], x["table"], x["index"])
            return {"kv": x["caches"]}

        return paged
    if case.op == "prune_kv":

        def prune(x):
            k, v, index, _, _ = ref.prune_kv_reference(
                x["scores"], x["candidates"], x["keys"], x["values"], None, case.max_keep, 0, case.max_len, "left"
            )
            return {"kv": k + v, "index": index}

        return prune

    def glimpse(x):
        k, v, index, _, scores = ref.glimpse_prune_reference(
            x["q"],
            x["keys"],
            x["values"],
            x["key_mask"],
            x["candidates"],
            SCORE_LAYER,
            x["scale"],
            None,
            case.max_keep,
            0,
            case.max_len,
            "left",
        )
        return {"kv": k + v, "index": index, "scores": scores}

    return glimpse


def _library_fn(case: Case, backend: str) -> Callable[[dict], dict]:
    """The library op on one backend, with max_len given (no host sync)."""
    if case.op == "glimpse_scores":
        return lambda x: {
            "probs": g.glimpse_scores(
                x["q"], x["keys"][0], x["key_mask"], scale=x["scale"], normalize="probs", backend=backend
            )
        }
    if case.op == "select_index":

        def select_index(x):
            keep = g.select_tokens(
                x["scores"], x["candidates"], threshold=None, max_keep=case.max_keep, min_keep=0, backend=backend
            )
            return {"index": g.keep_index(keep, max_len=case.max_len, padding_side="left", backend=backend)[0]}

        return select_index
    if case.op == "compact_kv":

        def compact(x):
            k, v = g.compact_kv(x["keys"], x["values"], x["index"], backend=backend)
            return {"kv": k + v}

        return compact
    if case.op == "compact_kv_paged":

        def paged(x):
            g.compact_kv_paged(x["caches"], x["table"], x["index"], backend=backend)
            return {"kv": x["caches"]}

        return paged
    if case.op == "prune_kv":

        def prune(x):
            k, v, index, _, _ = g.prune_kv(
                x["scores"],
                x["candidates"],
                x["keys"],
                x["values"],
                threshold=None,
                max_keep=case.max_keep,
                min_keep=0,
                max_len=case.max_len,
                padding_side="left",
                backend=backend,
            )
            return {"kv": k + v, "index": index}

        return prune

    def glimpse(x):
        k, v, index, _, scores = g.glimpse_prune(
            x["q"],
            x["keys"],
            x["values"],
            x["key_mask"],
            x["candidates"],
            SCORE_LAYER,
            scale=x["scale"],
            threshold=None,
            max_keep=case.max_keep,
            min_keep=0,
            max_len=case.max_len,
            padding_side="left",
            backend=backend,
        )
        return {"kv": k + v, "index": index, "scores": scores}

    return glimpse


def _eager_fn(case: Case) -> Callable[[dict], dict]:
    if case.op == "glimpse_scores":
        return lambda x: {"probs": peers.eager_glimpse_scores(x["q"], x["keys"][0], x["key_mask"], x["scale"])}
    if case.op == "select_index":
        return lambda x: {
            "index": peers.eager_keep_index(peers.eager_select(x["scores"], x["candidates"], case.max_keep))
        }
    if case.op == "compact_kv":

        def compact(x):
            k, v = peers.eager_compact_by_index(x["keys"], x["values"], x["index"])
            return {"kv": k + v}

        return compact
    if case.op == "prune_kv":

        def prune(x):
            k, v, index, _ = peers.eager_prune_kv(x["scores"], x["candidates"], x["keys"], x["values"], case.max_keep)
            return {"kv": k + v, "index": index}

        return prune

    def glimpse(x):
        k, v, index, scores = peers.eager_glimpse_prune(
            x["q"], x["keys"], x["values"], x["key_mask"], x["candidates"], SCORE_LAYER, x["scale"], case.max_keep
        )
        return {"kv": k + v, "index": index, "scores": scores}

    return glimpse


def _into_fn(backend: str) -> Callable[[dict], dict]:
    """compact_kv_into on one backend, into output caches allocated on the first call."""
    outputs: list[torch.Tensor] = []

    def into(x: dict) -> dict:
        keys, values = x["keys"], x["values"]
        if not outputs:
            length = x["index"].shape[1]
            outputs.extend(t.new_empty(t.shape[0], t.shape[1], length, t.shape[3]) for t in keys + values)
        g.compact_kv_into(keys, values, x["index"], outputs[: len(keys)], outputs[len(keys) :], backend=backend)
        return {"kv": outputs}

    return into


def _copy_fn(case: Case, device: str) -> Callable[[dict], dict]:
    """The case's ceiling: one copy of half the bytes the op must move (a copy reads and
    writes each), timed like the kernels (cold caches), so "% copy" means the same in every
    row. The buffers are allocated on the first call (providers are also built just to be
    counted)."""
    buffers: list[torch.Tensor] = []

    def copy(x: dict) -> dict:
        if not buffers:
            src = torch.empty(case.moved_bytes() // 2, dtype=torch.uint8, device=device)
            buffers.extend([src, torch.empty_like(src)])
        return {"copied": buffers[1].copy_(buffers[0])}

    return copy


def check(case: Case, provider: str, got: dict, want: dict) -> tuple[bool, str]:
    """Exact for indices and compacted caches; scores within tolerance. The eager peer
    scores in bf16, which reorders near-equal scores of random data: it must keep the same
    number of tokens per row, and its index agreement is only reported."""
    lenient = provider == "eager" and case.op in ("glimpse_scores", "glimpse_prune")
    notes = []
    for key, expected in want.items():
        actual = got[key]
        if key in ("probs", "scores"):
            scale = expected.abs().max().item() or 1.0
            err = (actual.float() - expected.float()).abs().max().item() / scale
            notes.append(f"{key} rel err {err:.1e}")
            if err > (5e-2 if lenient else 1e-4):
                return False, "; ".join(notes)
        elif key == "index":
            if actual.shape != expected.shape:
                return False, f"index shape {tuple(actual.shape)} != {tuple(expected.shape)}"
            agree = (actual == expected).float().mean().item()
            notes.append(f"index agreement {agree:.4f}")
            same_lengths = torch.equal((actual >= 0).sum(1), (expected >= 0).sum(1))
            if not same_lengths or (agree < 1.0 and not lenient):
                return False, "; ".join(notes)
        elif key == "kv" and not lenient:
            if any(not torch.equal(a, b) for a, b in zip(actual, expected)):
                return False, "compacted caches differ"
    return True, "; ".join(notes) or "exact"


def providers_for(case: Case, device: str, wanted: set[str]) -> dict[str, Callable[[dict], dict]]:
    op = REQUIRED_OP[case.op]
    available = set(g.available_backends(op, device))
    if case.op == "select_index":
        available &= set(g.available_backends("keep_index", device))
    if device == "cpu":
        available.discard("triton")  # the interpreter is a correctness tool, not a provider
    # compact_kv_paged has no eager pipeline to compare with: its reference is the PyTorch way
    out: dict[str, Callable[[dict], dict]] = {} if case.op == "compact_kv_paged" else {"eager": _eager_fn(case)}
    out["reference"] = _reference_fn(case)
    out["reference+compile"] = torch.compile(_reference_fn(case), dynamic=False)
    for backend in ("native", "triton"):
        if backend in available:
            out[backend] = _library_fn(case, backend)
            if case.op == "compact_kv":
                out[f"{backend}_into"] = _into_fn(backend)
    out["copy"] = _copy_fn(case, device)
    return {name: fn for name, fn in out.items() if name in wanted}


def case_inputs(case: Case, device: str) -> tuple[dict, dict]:
    """(fresh random inputs, the reference's outputs) of a case."""
    torch.manual_seed(0)
    inputs = make_inputs(case, device)
    if case.op == "compact_kv":
        keep = ref.select_tokens_reference(inputs["scores"], inputs["candidates"], None, case.max_keep, 0)
        inputs["index"] = ref.keep_index_reference(keep, case.max_len, "left")[0]
    return inputs, _reference_fn(case)(fresh_inputs(case, inputs))


def fresh_inputs(case: Case, inputs: dict) -> dict:
    """The inputs a provider may change: compact_kv_paged works in place, so each check and
    each provider's timed calls get their own caches (repeated timed calls keep moving rows
    of the same caches: the same bytes each time)."""
    if case.op != "compact_kv_paged":
        return inputs
    return {**inputs, "caches": [c.clone() for c in inputs["caches"]]}


def figures(case: Case, p50_ms: float, ceiling_gbps: float | None, eager_ms: float | None) -> dict:
    """What a timed row reports beside its time (bench/run.py and the pytest-benchmark suite):
    bytes a perfect kernel moves, GB/s, % of the case's copy ceiling, speed-up over eager."""
    out = {"moved_bytes": case.moved_bytes(), "gbps": case.moved_bytes() / (p50_ms * 1e-3) / 1e9}
    if ceiling_gbps:
        out["pct_copy_bw"] = 100 * out["gbps"] / ceiling_gbps
        out["copy_ceiling_gbps"] = ceiling_gbps
    if eager_ms:
        out["speedup_vs_eager"] = eager_ms / p50_ms
    return out


def run_case(
    case: Case, device: str, wanted: set[str], budget_s: float, copy_gbs: float, progress: Progress
) -> list[dict]:
    inputs, want = case_inputs(case, device)
    rows = []
    for name, fn in providers_for(case, device, wanted).items():
        row = {"case": case.as_dict(), "name": case.name(), "provider": name}
        try:
            if name != "copy":
                ok, note = check(case, name, fn(fresh_inputs(case, inputs)), want)
                row["check"] = note
                if not ok:
                    gate_failed(row, note, progress)
                    rows.append(row)
                    continue
            timed = fresh_inputs(case, inputs)  # in place (compact_kv_paged): never the pristine inputs
            row.update(measure(lambda fn=fn, timed=timed: fn(timed), device, budget_s, cold=True))
        except Exception as exc:  # a provider that crashes is reported, the run goes on (and fails at the end)
            record_error(row, exc)
        rows.append(row)
        progress.step(f"{case.name()} {name}")
    eager = next((r["p50"] for r in rows if r["provider"] == "eager" and "p50" in r), None)
    # % copy: against this case's copy row (same bytes, cold caches), else the run's copy bandwidth
    copy = next((r for r in rows if r["provider"] == "copy" and "p50" in r), None)
    ceiling = figures(case, copy["p50"], None, None)["gbps"] if copy else copy_gbs
    for row in rows:
        if "p50" in row:
            row.update(figures(case, row["p50"], ceiling, eager))
    return rows


def print_table(rows: list[dict], device: str) -> None:
    header = f"{'case':<40} {'provider':<18} {'p50 ms':>10} {'spread':>6} {'vs eager':>9} {'GB/s':>8} {'% copy':>7}"
    header += "\n" + f"{'(spread: p20-p80 as a share of p50, ! above 20%; attention rows: time relative to SDPA':>99}"
    header += "\n" + f"{'unmasked, t; TFLOP/s; peak extra memory)':>99}"
    print("\n" + header + "\n" + "-" * len(header.splitlines()[0]))
    last = None
    for row in rows:
        name = row["name"] if row["name"] != last else ""
        last = row["name"]
        if "p50" not in row:
            print(f"{name:<40} {row['provider']:<18} {row.get('error', 'skipped')[:60]}")
            continue
        if "tflops" in row:
            memory = f" {row['peak_extra_mib']:>9.0f} MiB" if row.get("peak_extra_mib") is not None else ""
            print(
                f"{name:<40} {row['provider']:<18} {row['p50']:>10.3f} {spread_text(row):>6} "
                f"{row.get('time_vs_sdpa_unmasked', 0):>8.2f}t "
                f"{row['tflops']:>8.3f} TFLOP/s{memory}"
            )
            continue
        speed = f"{row['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in row else "-"
        print(
            f"{name:<40} {row['provider']:<18} {row['p50']:>10.3f} {spread_text(row):>6} {speed:>9} "
            f"{row['gbps']:>8.1f} {row['pct_copy_bw']:>6.1f}%"
        )


def select(args: argparse.Namespace, cases: list, visual: Callable = lambda c: c.visual) -> list:
    """The cases that --visual, --batch and --keep (where the keep ratio matters) let through."""
    return [
        c
        for c in cases
        if (not args.visual or visual(c) in args.visual)
        and (not args.batch or c.batch in args.batch)
        and (
            not args.keep
            or getattr(c, "op", None) == "glimpse_scores"
            or not hasattr(c, "keep_ratio")
            or any(abs(c.keep_ratio - k) < 1e-9 for k in args.keep)
        )
    ]


def write_results(
    args: argparse.Namespace, machine: dict, extra: dict, rows: list[dict], kind: str, quiet: bool = False
) -> None:
    """JSON to --json, else bench/results/<device>/<date>-<sha>[-e2e][-smoke].json."""
    out = args.json or Path(__file__).resolve().parent / "results" / str(machine["device_slug"]) / (
        f"{machine['timestamp'][:10]}-{str(machine['git_sha'])[:8]}{kind}{'-smoke' if args.smoke else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {**machine, **extra}, "results": rows}, indent=1))
    if not quiet:
        print(f"\nwrote {out}")


def run_each(
    cases: list,
    run_case: Callable,
    device: str,
    budget: float,
    progress: Progress,
    save: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """run_case(case, device, budget, progress) for each end-to-end case, in order; ``save``
    gets the rows so far after each case."""
    rows: list[dict] = []
    for case in cases:
        rows += run_case(case, device, budget, progress)
        if save is not None:
            save(rows)
        if device == "cuda":
            torch.cuda.empty_cache()  # the case's model is gone; give its memory back before the next one
    return rows


def gate_exit_code(rows: list[dict]) -> int:
    """1 (with a line per problem on stderr) when timing.run_failures finds any: a failed
    correctness gate, a compilation inside a timed loop, a provider of any kind that raised,
    or nothing measured; else 0."""
    problems = run_failures(rows)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


def run_e2e_hf(args: argparse.Namespace, device: str, budget: float) -> int:
    from e2e_hf import hf_cases, print_hf_table, run_hf_case

    cases = select(args, hf_cases(device, args.smoke, args.model, args.attn_implementation))
    attention = args.attn_implementation
    kind = "-e2e-hf" + ("" if attention == "sdpa" else "-" + attention.replace("/", "_"))
    machine = machine_info(device)
    print(
        f"glimpse-ops HF end-to-end bench on {machine['device']} (torch {machine['torch']}, "
        f"git {str(machine['git_sha'])[:10]}): "
        f"{len(cases)} cases, 3 providers, attn_implementation {attention}"
    )
    progress = Progress(3 * len(cases))
    rows = run_each(
        cases,
        run_hf_case,
        device,
        budget,
        progress,
        lambda done: write_results(args, machine, {"partial": True}, done, kind, quiet=True),
    )
    print_hf_table(rows)
    write_results(args, machine, {}, rows, kind)
    return gate_exit_code(rows)


def run_e2e(args: argparse.Namespace, device: str, budget: float) -> int:
    if args.hf:
        return run_e2e_hf(args, device, budget)
    cases, training = select(args, e2e_cases(device, args.smoke)), select(args, train_cases(device, args.smoke))
    machine = machine_info(device)
    print(
        f"glimpse-ops end-to-end bench on {machine['device']} (torch {machine['torch']}, "
        f"git {str(machine['git_sha'])[:10]}): "
        f"{len(cases)} inference cases, {len(training)} training cases, 3 providers each"
    )
    progress = Progress(3 * (len(cases) + len(training)))
    rows = run_each(
        cases,
        run_e2e_case,
        device,
        budget,
        progress,
        lambda done: write_results(args, machine, {"partial": True}, done, "-e2e", quiet=True),
    )
    train_rows = run_each(
        training,
        run_train_case,
        device,
        budget,
        progress,
        lambda done: write_results(args, machine, {"partial": True}, rows + done, "-e2e", quiet=True),
    )
    print_e2e_table(rows)
    print_train_table(train_rows)
    rows += train_rows
    write_results(args, machine, {}, rows, "-e2e")
    return gate_exit_code(rows)


def run_vllm(args: argparse.Namespace) -> int:
    """--vllm (bench/serving.py, the offline engine) or --vllm --serve (bench/serving_http.py,
    through `vllm serve`): stock against the plugin per case, a JSON row per engine."""
    if args.memory:
        from serving_memory import make_memory_bench as make_target
        from serving_memory import memory_cases as cases_for
        from serving_memory import print_memory_table as print_rows
        from serving_memory import run_memory_case as run_case

        what, kind = "(peak memory of a prefill step) ", "-vllm-memory"
    elif args.serve:
        from serving_http import make_model as make_target
        from serving_http import print_serve_table as print_rows
        from serving_http import run_serve_case as run_case
        from serving_http import serve_cases as cases_for

        what, kind = "through `vllm serve` ", "-vllm-serve"
    else:
        from serving import make_bench as make_target
        from serving import print_serving_table as print_rows
        from serving import run_serving_case as run_case
        from serving import serving_cases as cases_for

        what, kind = "", "-vllm"
    target = make_target()
    cases, ratios = cases_for(args.smoke)
    machine = machine_info("cpu")
    print(
        f"glimpse-ops vLLM serving bench {what}on {machine['device']} (git {str(machine['git_sha'])[:10]}): "
        f"{len(cases)} cases x (stock + {len(ratios)} keep ratios)"
    )
    progress = Progress(len(cases) * (1 + len(ratios)))
    rows: list[dict] = []
    for case in cases:
        rows += run_case(target, case, ratios, progress)
        write_results(args, machine, {"partial": True}, rows, kind, quiet=True)
    print_rows(rows)
    write_results(args, machine, {}, rows, kind)
    return gate_exit_code(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="only the 4k-visual-token, B=1, 10%%-kept cases")
    parser.add_argument(
        "--full",
        action="store_true",
        help="every size, batch and keep ratio (the default on a GPU; ~17 min on 2 CPU cores)",
    )
    parser.add_argument(
        "--e2e", action="store_true", help="the end-to-end LVLM cases instead of the op cases (bench/e2e.py)"
    )
    parser.add_argument(
        "--hf",
        action="store_true",
        help="with --e2e: the HF Qwen2.5-VL cases instead (bench/e2e_hf.py; needs transformers)",
    )
    parser.add_argument(
        "--model",
        default="qwen2_5_vl",
        help="with --e2e --hf: the model family (qwen2_5_vl, qwen3_vl, internvl, llava_next, llava_onevision; "
        "bench/hf_families.py)",
    )
    parser.add_argument(
        "--attn-implementation",
        default="sdpa",
        help="with --e2e --hf: the model's attention (sdpa; flash_attention_2 where flash-attn is installed, ...)",
    )
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="serving: stock vLLM against the glimpse_ops.vllm plugin (bench/serving.py; needs vLLM)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="with --vllm: through `vllm serve` and concurrent openai clients (bench/serving_http.py)",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="with --vllm: the peak memory of a 16k-visual-token pruning prefill step against the stock step "
        "(bench/serving_memory.py; ~10 min on 2 CPU cores)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--ops",
        nargs="*",
        help="only these ops (glimpse_scores select_index compact_kv prune_kv glimpse_prune soft_mask_attention)",
    )
    parser.add_argument("--providers", nargs="*", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument(
        "--max-input-gib",
        type=float,
        default=None,
        help="skip cases whose inputs exceed this (default: 1/6 of RAM on CPU, 1/3 of GPU memory)",
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of timing per provider (default 0.3 CPU, 1.0 GPU)"
    )
    parser.add_argument(
        "--visual", type=int, nargs="*", help="only cases with these visual-token counts (attention: N)"
    )
    parser.add_argument("--batch", type=int, nargs="*", help="only cases with these batch sizes")
    parser.add_argument("--keep", type=float, nargs="*", help="only kernel cases with these keep ratios (e.g. 0.074)")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results (default bench/results/<device>/...); "
        "rewritten after every case, so a run cut short keeps what it measured",
    )
    args = parser.parse_args(argv)

    device = args.device
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break chatter of the compiled reference
    budget = args.budget if args.budget is not None else (1.0 if device == "cuda" else 0.3)
    if args.max_input_gib is not None:
        limit = args.max_input_gib * 2**30
    elif device == "cuda":
        limit = torch.cuda.get_device_properties(0).total_memory / 3
    else:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 6
    if args.hf and not args.e2e:
        parser.error("--hf goes with --e2e")
    if args.model != "qwen2_5_vl" and not args.hf:
        parser.error("--model goes with --e2e --hf")
    if args.attn_implementation != "sdpa" and not args.hf:
        parser.error("--attn-implementation goes with --e2e --hf")
    if (args.serve or args.memory) and not args.vllm:
        parser.error("--serve and --memory go with --vllm")
    if args.serve and args.memory:
        parser.error("--serve and --memory are separate runs")
    if args.vllm:
        return run_vllm(args)
    if args.e2e:
        return run_e2e(args, device, budget)
    full = args.full or device == "cuda"
    cases = select(args, [c for c in all_cases(args.smoke, full) if not args.ops or c.op in args.ops])
    runnable = [c for c in cases if c.input_bytes() <= limit]
    skipped = [c for c in cases if c.input_bytes() > limit]
    machine = machine_info(device)
    print(
        f"glimpse-ops bench on {machine['device']} (torch {machine['torch']}, triton {machine['triton']}, "
        f"git {str(machine['git_sha'])[:10]})"
    )
    print(
        f"{len(runnable)} cases, {len(skipped)} skipped as larger than {limit / 2**30:.1f} GiB of inputs; "
        f"Qwen2.5-VL-7B geometry, {COMPACTED_LAYERS} compacted layers, bf16"
    )
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"measured copy bandwidth: {copy_gbs:.1f} GB/s")
    wanted = set(args.providers)
    attention = [c for c in attention_cases(args.smoke, device) if not args.ops or c.op in args.ops]
    attention = select(args, attention, visual=lambda c: c.n)
    attention = [c for c in attention if c.input_bytes() <= limit]
    progress = Progress(
        sum(len(providers_for(c, device, wanted)) for c in runnable)
        + sum(len(attention_providers(device, c.n)) for c in attention)
    )
    rows: list[dict] = []
    for case in runnable:
        rows += run_case(case, device, wanted, budget, copy_gbs, progress)
        torch._dynamo.reset()
        write_results(args, machine, {"copy_gbs": copy_gbs, "partial": True}, rows, "", quiet=True)
    gates: dict = {}
    for case in attention:
        rows += run_attention_case(case, device, budget, progress, gates)
        write_results(args, machine, {"copy_gbs": copy_gbs, "partial": True}, rows, "", quiet=True)
    rows += [
        {"case": c.as_dict(), "name": c.name(), "provider": "-", "error": "skipped: inputs exceed the memory limit"}
        for c in skipped
    ]
    print_table(rows, device)
    write_results(args, machine, {"copy_gbs": copy_gbs}, rows, "")
    return gate_exit_code(rows)


if __name__ == "__main__":
    raise SystemExit(main())
