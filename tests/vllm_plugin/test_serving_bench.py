"""bench/run.py --vllm --smoke runs both engines, passes its correctness gate (the plugin's
tokens equal glimpse_ops.hf's) and reports the serving figures. Skipped without vLLM."""

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
