"""bench/run.py --e2e on CPU at its smoke size: the three providers run, agree, and report."""

import json
import math
import sys

import pytest
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))


@pytest.mark.slow
def test_e2e_smoke_run_reports_every_provider(tmp_path):
    import e2e
    import run

    out = tmp_path / "e2e.json"
    assert run.main(["--e2e", "--smoke", "--device", "cpu", "--budget", "0.05", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["provider"] for r in rows] == [
        "unpruned",
        "glimpse_ops",
        "eager",
        "unmasked",
        "atp_soft_mask",
        "atp_sdpa_dense_mask",
    ]
    assert all("error" not in r for r in rows), rows
    train, rows = rows[3:], rows[:3]
    assert all(r["step_ms"] > 0 and r["case"]["kind"] == "train_step" for r in train)
    assert all(r["step"]["p20"] <= r["step"]["p50"] <= r["step"]["p80"] for r in train), "spreads kept"
    assert all(r[k]["p20"] <= r[k]["p50"] <= r[k]["p80"] for r in rows[:3] for k in ("prefill", "decode"))
    assert train[0]["step_vs_unmasked"] == 1.0
    assert "same kept positions: True" in rows[1]["check"]
    case = e2e.e2e_cases("cpu", True)[0]
    seq = 1 + case.visual + case.text
    kept = math.ceil(e2e.KEEP_RATIO * case.visual)
    for row in rows[1:]:
        # Every layer's cache holds the text, BOS and the kept visual tokens only.
        assert row["kv_cache_share"] == pytest.approx((seq - case.visual + kept) / seq, rel=1e-6)
        assert 0 < row["overhead_share"] < 1
        assert row["decode_tok_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen2_5_vl", "qwen3_vl", "internvl", "llava_next", "llava_onevision"])
def test_e2e_hf_smoke_run_reports_every_provider(tmp_path, model):
    pytest.importorskip("transformers")
    import run

    out = tmp_path / "e2e-hf.json"
    argv = ["--e2e", "--hf", "--model", model, "--smoke", "--device", "cpu", "--budget", "0.05", "--json", str(out)]
    assert run.main(argv) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["case"]["family"] for r in rows} == {model}
    assert [r["provider"] for r in rows] == ["unpatched", "glimpse_ops", "eager_patch"]
    assert all("error" not in r for r in rows), rows
    assert rows[2]["check"].startswith("kept positions differing from glimpse_ops: 0.00%")
    visual, text = rows[0]["visual_tokens"], rows[0]["case"]["text"]
    candidates = visual
    if model.startswith("llava"):  # the tile grid nearest the case's count; its newline tokens are kept
        import hf_families

        grid_rows, _, tokens = hf_families.anyres_grid(model, "small", rows[0]["case"]["visual"])
        tile, patch, _ = hf_families.ANYRES_VISION[(model, "small")]
        side = tile // patch
        assert visual == tokens and f"({tokens} visual tokens)" in rows[0]["name"]
        candidates = visual - grid_rows * side
    seq = visual + (2 if model.startswith("qwen") else 0) + text  # Qwen: vision start and end tokens
    kept = visual - candidates + math.ceil(0.074 * candidates)
    # every layer's cache, 0..K compacted in place and K+1.. computed on the kept tokens
    assert rows[1]["kv_cache_share"] == pytest.approx((seq - visual + kept) / seq, rel=1e-6)
    # every median keeps its spread; the stock row carries the hand-written decode loop's cross-check
    for row in rows:
        for key in ("prefill", "layers_0_to_k", "decode"):
            assert row[key]["p20"] <= row[key]["p50"] <= row[key]["p80"], (row["provider"], key)
    assert rows[0]["decode_direct_tok_s"] > 0 and "decode_direct_tok_s" not in rows[1]
