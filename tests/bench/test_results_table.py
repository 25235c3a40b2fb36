"""bench/results_table.py (the tables of bench/RESULTS.md) and the CPU peak-memory figure
of the benchmark, on made-up rows and a real allocation."""

from __future__ import annotations

import json
import sys

import torch
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

import results_table  # noqa: E402
import timing  # noqa: E402


def _kernel_row(name: str, provider: str, p50: float) -> dict:
    return {"case": {"op": "compact_kv"}, "name": name, "provider": provider, "p50": p50, "pct_copy_bw": 40.0}


def _attention_row(provider: str, p50: float, peak: float) -> dict:
    name = "soft_mask_attention N=512 B=1 fwd+bwd"
    return {"case": {"n": 512}, "name": name, "provider": provider, "p50": p50, "tflops": 0.1,
            "time_vs_sdpa_unmasked": p50 / 100.0, "peak_extra_mib": peak}  # fmt: skip


def _print_tables(tmp_path, capsys, **payload) -> str:
    """Write a run JSON (a test machine and ``payload``), print its tables, return them."""
    path = tmp_path / "run.json"
    machine = {"device": "test CPU", "torch": "x", "git_sha": "0123456789abc", "cuda": None}
    path.write_text(json.dumps({"machine": machine, **payload}))
    assert results_table.main([str(path)]) == 0
    return capsys.readouterr().out


def test_tables_take_the_figures_from_the_rows(tmp_path, capsys):
    rows = [
        _kernel_row("a", "native", 2.0),
        _kernel_row("a", "reference+compile", 3.0),
        _kernel_row("a", "eager", 9.0),
        {**_kernel_row("a", "native_into", 1.5), "pct_copy_bw": 55.0},
        _kernel_row("b", "native", 4.0),
        _kernel_row("b", "reference+compile", 3.0),
        {"name": "b", "provider": "triton", "error": "not timed"},
        _attention_row("sdpa_unmasked", 100.0, 24),
        _attention_row("sdpa_dense_mask", 200.0, 112),
        _attention_row("sdpa_math_mask", 180.0, 112),
        _attention_row("native", 120.0, 16),
    ]
    out = _print_tables(tmp_path, capsys, results=rows)
    assert "| a | 2.00 | 3.00 | 1.50x | 9.00 | 40% | 55% |" in out
    assert "| b | 4.00 | 3.00 | 0.75x | - | 40% | - |" in out
    assert "native at least as fast as reference+compile on 1 of 2 cases." in out
    # the best dense-mask SDPA is the math one (180 ms): native 120 / 180
    assert "|  | native | 120.0 | 1.20x | 0.67x | 16 |" in out


def test_cpu_peak_memory_counts_what_one_call_allocates():
    live = torch.ones(4 << 20)  # 16 MiB that exist before the call do not count

    def call():
        a = torch.empty(8 << 20)  # 32 MiB
        b = torch.empty(2 << 20)  # + 8 MiB live together
        del a, b
        return torch.empty(1 << 20)  # 4 MiB after both were freed

    assert timing.peak_mib(call, "cpu") == 40.0
    assert live.numel() == 4 << 20


def test_an_attention_only_run_prints_no_empty_kernel_table(tmp_path, capsys):
    out = _print_tables(tmp_path, capsys, results=[_attention_row("native", 120.0, 16)])
    assert "reference+compile" not in out and "|  | native | 120.0 |" not in out
    assert "| soft_mask_attention N=512 B=1 fwd+bwd | native | 120.0 |" in out


def test_gather_floor_table(tmp_path, capsys):
    row = {"case": "compact_kv Nv=4k B=1 keep=7.4%", "kept_bytes": 1, "read kept": 3.0, "read contiguous": 1.5,
           "copy": 2.0, "native_into": 3.3}  # fmt: skip
    out = _print_tables(tmp_path, capsys, rows=[row])  # bench/gather_floor.py's JSON has rows, not results
    assert "| compact_kv Nv=4k B=1 keep=7.4% | 3.00 | 1.50 | 2.00 | 3.30 | 1.50x | 1.10x |" in out


def test_e2e_tables_compare_each_provider_with_the_cases_first_row(tmp_path, capsys):
    def inference(provider: str, prefill: float, decode: float, kv: float, **extra) -> dict:
        return {"name": "e2e small 1k B=4", "provider": provider, "prefill_ms": prefill, "decode_tok_s": decode,
                "kv_cache_share": kv, "peak_mib": 99.0, **extra}  # fmt: skip

    def step(provider: str, ms: float) -> dict:
        return {"name": "train small 1k B=1", "provider": provider, "step_ms": ms, "peak_mib": None}

    rows = [
        inference("unpruned", 2000.0, 100.0, 1.0),
        inference("glimpse_ops", 1600.0, 150.0, 0.129, overhead_share=0.0312),
        {"name": "e2e small 1k B=4", "provider": "eager", "error": "failed the correctness gate"},
        step("unmasked", 1600.0),
        step("atp_soft_mask", 1200.0),
    ]
    out = _print_tables(tmp_path, capsys, results=rows)
    assert "| e2e small 1k B=4 | unpruned | 2000.0 | 1.00x | - | 100.0% | 100.0 | 1.00x | 99 |" in out
    assert "|  | glimpse_ops | 1600.0 | 1.25x | 3.1% | 12.9% | 150.0 | 1.50x | 99 |" in out
    assert "eager" not in out  # a row without figures is left out, not printed as zeros
    assert "| train small 1k B=1 | unmasked | 1600.0 | 1.00x | - |" in out
    assert "|  | atp_soft_mask | 1200.0 | 0.75x | - |" in out
    assert "reference+compile" not in out and "vs SDPA unmasked" not in out
