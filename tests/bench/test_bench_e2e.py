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
    for row in rows[1:]:
        assert "same kept positions: True; max |logit diff| 0.00e+00" in row["check"]
    case = e2e.e2e_cases("cpu", True)[0]
    seq = 1 + case.visual + case.text
    kept = math.ceil(e2e.KEEP_RATIO * case.visual)
    for row in rows[1:]:
        # Every layer's cache holds the text, BOS and the kept visual tokens only.
        assert row["kv_cache_share"] == pytest.approx((seq - case.visual + kept) / seq, rel=1e-6)
        assert 0 < row["overhead_share"] < 1
        assert row["decode_tok_s"] > 0


def test_e2e_gate_compares_the_decode_step_too(monkeypatch):
    """The gate's logits include a decode step, which reads the compacted caches of layers
    0..K: an eager pipeline that keeps the right positions but compacts the wrong values fails."""
    import dataclasses

    import e2e
    import torch

    case = dataclasses.replace(e2e.e2e_cases("cpu", True)[0], visual=64)
    torch.manual_seed(0)
    model = e2e._build_model(case.config(), "cpu", case.dtype).eval()
    pruner = e2e.GlimpsePruner(model, threshold=None, max_keep_ratio=e2e.KEEP_RATIO, min_keep=1).eval()
    images, ids, mask = e2e.make_prompt(case, "cpu")
    with torch.no_grad():
        prefix = pruner.glimpse_prefix(model, images, ids, mask)
        ours = pruner.prune_prefix(model, prefix)
        eager = e2e.EagerGlimpsePrune(pruner).prune_prefix(model, prefix)
        ok, note = e2e._check(model, ours, eager, case.dtype)
        assert ok and "max |logit diff| 0.00e+00" in note, note
        wrong = dataclasses.replace(eager, caches=[(k, v.flip(2)) for k, v in eager.caches])
        ok, note = e2e._check(model, ours, wrong, case.dtype)
    assert not ok and "same kept positions: True" in note, note


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
    for row in rows[1:]:  # the two patches keep the same tokens and give the same logits
        assert row["check"].startswith("kept positions differing between the patches: 0.00%; max |logit diff| 0.00e+00")
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


@pytest.mark.slow
def test_e2e_hf_gate_fails_when_the_patches_logits_differ(monkeypatch):
    """The gate compares the two patches' logits where they keep the same tokens: an eager
    patch that keeps the right positions but compacts the wrong values fails it."""
    pytest.importorskip("transformers")
    import e2e_hf

    from glimpse_ops.glimpseprune import default_layer

    case = e2e_hf.hf_cases("cpu", smoke=True)[0]
    model, inputs = e2e_hf.build_model(case, "cpu"), e2e_hf.make_inputs(case, "cpu")
    layer = default_layer(len(model.model.language_model.layers))
    ok, note = e2e_hf._gate(model, inputs, layer, case.dtype)
    assert ok, note
    honest = e2e_hf.eager_selection

    def wrong_values(x):
        new_keys, new_values, index, scores = honest(x)
        return new_keys, [v.flip(2) for v in new_values], index, scores

    monkeypatch.setattr(e2e_hf, "eager_selection", wrong_values)
    ok, note = e2e_hf._gate(model, inputs, layer, case.dtype)
    assert not ok and "differing between the patches: 0.00%" in note, note


@pytest.mark.slow
def test_e2e_hf_runs_under_flash_attention(tmp_path, monkeypatch):
    """--attn-implementation flash_attention_2 with FlashAttention's interface in plain PyTorch
    as the kernel transformers loads (tests/hf/plain_flash.py): the three providers run under
    it, the patches agree, and the rows name the implementation."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO_ROOT / "tests" / "hf"))
    import plain_flash
    import run

    plain_flash.install(monkeypatch)
    out = tmp_path / "e2e-hf-flash.json"
    argv = ["--e2e", "--hf", "--smoke", "--device", "cpu", "--budget", "0.05", "--json", str(out)]
    assert run.main([*argv, "--attn-implementation", "flash_attention_2"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["provider"] for r in rows] == ["unpatched", "glimpse_ops", "eager_patch"]
    assert all("error" not in r and r["case"]["attention"] == "flash_attention_2" for r in rows), rows
    assert rows[0]["name"].endswith(" flash_attention_2")
    for row in rows[1:]:
        assert row["check"].startswith("kept positions differing between the patches: 0.00%; max |logit diff| 0.00e+00")
    # B=1: the text model calls the padded-batch kernel (the ViT's windows go through varlen)
    kept_lengths = {c[2][0] for c in plain_flash.CALLS if c[0] == "dense"}
    seq = rows[0]["visual_tokens"] + 2 + rows[0]["case"]["text"]
    assert seq in kept_lengths and min(kept_lengths) < seq, "layers K+1.. run the compacted prompt"
