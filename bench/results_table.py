"""Markdown tables of a ``bench/run.py`` JSON, for bench/RESULTS.md: figures are copied from
the measurement, never typed by hand.

    python bench/results_table.py bench/results/<device>/<file>.json

Kernel rows: per case, native (or triton) against reference+compile and the eager peer, and
% of the case's copy ceiling (compact_kv also written into caches allocated once:
``<ours>_into``). Attention rows: each provider's time, its ratio to SDPA
without a mask and to the best dense-mask SDPA, and its peak extra memory. A
``bench/gather_floor.py`` JSON: the kept-row read against the copy and compact_kv_into.
End-to-end rows (``--e2e``, ``--e2e --hf``): prefill, pruning overhead, KV share and decode
against the unpruned model, and the ATP training step against the unmasked one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DENSE_MASK = ("sdpa_dense_mask", "sdpa_math_mask", "sdpa_efficient_mask")


def _by_case(rows: list[dict], key: str = "p50") -> dict[str, dict[str, dict]]:
    """Rows carrying the figure ``key``, by case name then provider, in run order."""
    cases: dict[str, dict[str, dict]] = {}
    for row in rows:
        if key in row:
            cases.setdefault(row["name"], {})[row["provider"]] = row
    return cases


def kernel_table(rows: list[dict], ours: str) -> str:
    lines = [
        f"| case | {ours} ms | reference+compile ms | {ours} vs compile | eager ms | {ours} % copy | into % copy |",
        "|---|---|---|---|---|---|---|",
    ]
    met = total = 0
    for name, providers in _by_case([r for r in rows if "tflops" not in r]).items():
        mine, compiled = providers.get(ours), providers.get("reference+compile")
        if mine is None:
            continue
        eager = providers.get("eager")
        ratio = compiled["p50"] / mine["p50"] if compiled else None
        if ratio is not None:
            total += 1
            met += ratio >= 1.0
        lines.append(
            f"| {name} | {mine['p50']:.2f} | {compiled['p50']:.2f} | {ratio:.2f}x | "
            if compiled
            else f"| {name} | {mine['p50']:.2f} | - | - | "
        )
        lines[-1] += f"{eager['p50']:.2f} | " if eager else "- | "
        lines[-1] += f"{mine['pct_copy_bw']:.0f}% | " if "pct_copy_bw" in mine else "- | "
        into = providers.get(f"{ours}_into", {})
        lines[-1] += f"{into['pct_copy_bw']:.0f}% |" if "pct_copy_bw" in into else "- |"
    lines.append("")
    lines.append(f"{ours} at least as fast as reference+compile on {met} of {total} cases.")
    return "\n".join(lines)


def attention_table(rows: list[dict]) -> str:
    lines = [
        "| case | provider | ms | vs SDPA unmasked | vs best dense-mask SDPA | peak extra MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, providers in _by_case([r for r in rows if "tflops" in r]).items():
        dense = [providers[p]["p50"] for p in DENSE_MASK if p in providers]
        best_dense = min(dense) if dense else None
        for provider, row in providers.items():
            versus = f"{row['p50'] / best_dense:.2f}x" if best_dense else "-"
            peak = row.get("peak_extra_mib")
            lines.append(
                f"| {name} | {provider} | {row['p50']:.1f} | {row.get('time_vs_sdpa_unmasked', 0):.2f}x | "
                f"{versus} | {'-' if peak is None else f'{peak:.0f}'} |"
            )
            name = ""
    return "\n".join(lines)


def gather_floor_table(rows: list[dict]) -> str:
    """bench/gather_floor.py's rows: reading the kept rows alone against the copy ceiling."""
    lines = [
        "| case | read kept rows ms | read as many contiguous rows ms | copy ms | native_into ms "
        "| read kept / copy | native_into / read kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['read kept']:.2f} | {row['read contiguous']:.2f} | {row['copy']:.2f} | "
            f"{row['native_into']:.2f} | {row['read kept'] / row['copy']:.2f}x | "
            f"{row['native_into'] / row['read kept']:.2f}x |"
        )
    return "\n".join(lines)


def _peak(row: dict) -> str:
    return "-" if row.get("peak_mib") is None else f"{row['peak_mib']:.0f}"


def e2e_table(rows: list[dict]) -> str:
    """``--e2e`` (and ``--e2e --hf``) inference rows: each provider against the case's first
    row (the model without pruning), ratios computed from the medians in the rows."""
    lines = [
        "| case | provider | prefill ms | prefill speed-up | pruning overhead (% of prefill) | KV share "
        "| decode tok/s | decode speed-up | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, providers in _by_case(rows, "prefill_ms").items():
        base = next(iter(providers.values()))
        for row in providers.values():
            overhead = f"{row['overhead_share']:.1%}" if "overhead_share" in row else "-"
            lines.append(
                f"| {name} | {row['provider']} | {row['prefill_ms']:.1f} | "
                f"{base['prefill_ms'] / row['prefill_ms']:.2f}x | {overhead} | {row['kv_cache_share']:.1%} | "
                f"{row['decode_tok_s']:.1f} | {row['decode_tok_s'] / base['decode_tok_s']:.2f}x | {_peak(row)} |"
            )
            name = ""
    return "\n".join(lines)


def train_step_table(rows: list[dict]) -> str:
    """``--e2e`` training-step rows: each provider's step against the case's first (unmasked)."""
    lines = ["| case | provider | step ms | x unmasked | peak MiB |", "|---|---|---|---|---|"]
    for name, providers in _by_case(rows, "step_ms").items():
        base = next(iter(providers.values()))
        for row in providers.values():
            lines.append(
                f"| {name} | {row['provider']} | {row['step_ms']:.1f} | {row['step_ms'] / base['step_ms']:.2f}x "
                f"| {_peak(row)} |"
            )
            name = ""
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--ours", default=None, help="the provider to compare (default: native on CPU, else triton)")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    machine = data["machine"]
    print(f"{machine['device']}, torch {machine['torch']}, git {str(machine['git_sha'])[:10]}, {args.json.name}\n")
    if "rows" in data:  # bench/gather_floor.py
        print(gather_floor_table(data["rows"]))
        return 0
    rows = data["results"]
    ours = args.ours or ("triton" if machine.get("cuda") else "native")
    tables = []
    if any("p50" in r and "tflops" not in r for r in rows):
        tables.append(kernel_table(rows, ours))
    if any("tflops" in r for r in rows):
        tables.append(attention_table(rows))
    if any("prefill_ms" in r for r in rows):
        tables.append(e2e_table(rows))
    if any("step_ms" in r for r in rows):
        tables.append(train_step_table(rows))
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
