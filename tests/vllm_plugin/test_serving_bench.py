"""bench/run.py --vllm --smoke runs both engines, passes its correctness gate (the plugin's
tokens equal glimpse_ops.hf's) and reports the serving figures; --vllm --serve --smoke does the
same through two real `vllm serve` processes; --vllm --memory --smoke measures both engines' step
peaks. Skipped without vLLM."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import REPO_ROOT

pytest.importorskip("vllm")


def test_serving_smoke_run_reports_both_engines(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import run

    out = tmp_path / "serving.json"
    assert run.main(["--vllm", "--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["provider"] for r in rows] == ["stock", "glimpse_ops"]
    assert all("error" not in r for r in rows), rows
    stock, pruned = rows
    assert pruned["blocks_held_after_prefill"] < stock["blocks_held_after_prefill"]
    assert pruned["prompt_tokens_after_prefill"] < stock["prompt_tokens_after_prefill"]
    assert pruned["concurrency_vs_stock"] > 1


def test_served_smoke_run_reports_both_servers(tmp_path):
    """bench/run.py --vllm --serve --smoke: two real `vllm serve` processes (stock, plugin),
    each passing its gate (the first streamed answer equals the offline engine's) under
    concurrent openai clients; every figure present."""
    pytest.importorskip("openai")
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import run

    out = tmp_path / "serve.json"
    assert run.main(["--vllm", "--serve", "--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["provider"] for r in rows] == ["stock", "glimpse_ops"]
    assert all("error" not in r for r in rows), rows
    for row in rows:
        assert row["requests"] == 4 and row["requests_per_s"] > 0 and row["ttft"]["reps"] == 4
        assert row["peak_running"] >= 1 and row["decode_tok_per_s"]["p50"] > 0
    assert "in_flight_vs_stock" in rows[1]


def test_memory_smoke_run_reports_both_engines(tmp_path):
    """bench/run.py --vllm --memory --smoke (in a process of its own: its engines must not meet
    this process's earlier ones): both engines' step peaks, the plugin's gate (the kept counts
    its response reports) and its capture."""
    import subprocess

    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--vllm", "--memory", "--smoke",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["provider"] for r in rows] == ["stock", "glimpse_ops"]
    assert all("error" not in r for r in rows), rows
    stock, pruned = rows
    assert stock["peak_step_mib"] > 0 and pruned["peak_step_mib"] > 0 and pruned["capture_mib"] > 0
    assert pruned["kept_prompt_tokens"] < pruned["prompt_tokens"] == stock["prompt_tokens"]
