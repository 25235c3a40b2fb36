"""glimpse_ops.hf on tiny random Qwen2.5-VL, Qwen2-VL, Qwen3-VL and LLaVA models (CPU, fp32, sdpa and
eager)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.hf import testing  # noqa: E402
from glimpse_ops.hf._compat import require_transformers  # noqa: E402

FAMILIES = {
    "qwen2_5_vl": (testing.tiny_qwen2_5_vl, testing.qwen_inputs, 16),
    "qwen2_vl": (testing.tiny_qwen2_vl, testing.qwen_inputs, 16),
    "qwen3_vl": (testing.tiny_qwen3_vl, testing.qwen_inputs, 16),
    "internvl": (testing.tiny_internvl, testing.internvl_inputs, 16),
    "llava": (testing.tiny_llava, testing.llava_inputs, 64),
    # candidates per sample: image tokens less the image-newline tokens (72 - 8, 52 - 4)
    "llava_next": (testing.tiny_llava_next, testing.anyres_inputs, [64, 48]),
    "llava_onevision": (testing.tiny_llava_onevision, testing.anyres_inputs, [64, 48]),
}


@pytest.fixture(params=[(f, impl) for f in FAMILIES for impl in ("sdpa", "eager")], ids=lambda p: f"{p[0]}-{p[1]}")
def family(request, seed):
    name, impl = request.param
    build, inputs, n_visual = FAMILIES[name]
    return build(impl, seed=seed % 1000), inputs, n_visual, seed


def _generate(model, x, n=4, **kwargs):
    with torch.no_grad():
        return model.generate(**x, max_new_tokens=n, do_sample=False, **kwargs)


def test_importing_the_package_does_not_import_transformers():
    code = "import sys, glimpse_ops, glimpse_ops.hf; print('transformers' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_keep_everything_matches_the_stock_model_and_remove_restores_it(family):
    model, inputs, _, seed = family
    x = inputs(batch=2, text_lengths=[3, 6], seed=seed)
    with torch.no_grad():
        want = model(**x).logits[:, -1]
    want_ids = _generate(model, x)
    handle = hf.apply_glimpse_prune(model, threshold=None, max_keep_ratio=1.0)
    with torch.no_grad():
        got = model(**x).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(_generate(model, x), want_ids)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**x).logits[:, -1], want), "remove() restores bit-identical outputs"
    assert "_update_model_kwargs_for_generation" not in model.__dict__


def test_scores_and_compacted_caches_match_explicit_references(family):
    model, inputs, n_visual, seed = family
    x = inputs(batch=2, text_lengths=[2, 5], seed=seed)
    adapter = hf.adapters.adapter_for(model)
    K = 3
    captured = {}
    layer = adapter.layers[K]
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, a, k: captured.update(h=a[0] if a else k["hidden_states"], pe=k["position_embeddings"]),
            with_kwargs=True,
        )
    ]
    with torch.no_grad():
        stock = model(**x, use_cache=True)
    for h in hooks:
        h.remove()
    full_cache = stock.past_key_values
    with hf.pruned(model, layer=K, max_keep_ratio=0.25) as handle:
        with torch.no_grad():
            pruned = model(**x, use_cache=True)
        scores, index, candidates = handle.last_scores, handle.last_index, handle.last_visual
    # the glimpse row: the last prompt token's layer-K query against every layer-K key
    attn = layer.self_attn
    q = attn.q_proj(layer.input_layernorm(captured["h"]))[:, -1:]
    B = q.shape[0]
    q = q.view(B, 1, adapter.heads, adapter.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3
        q = attn.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = captured["pe"]
    q = adapter.apply_rope(q, q, cos[..., -1:, :], sin[..., -1:, :])[0]
    k = full_cache.layers[K].keys.repeat_interleave(adapter.heads // adapter.kv_heads, dim=1)
    logits = (q @ k.transpose(2, 3)).squeeze(2) / math.sqrt(adapter.head_dim)  # [B, H, S]
    valid = x["attention_mask"].bool()
    probs = torch.softmax(logits.masked_fill(~valid[:, None], float("-inf")), dim=-1).mean(dim=1)
    torch.testing.assert_close(scores[valid], probs[valid], rtol=1e-4, atol=1e-6)
    visual = (x["input_ids"] == adapter.image_token_id) & valid
    assert bool((candidates <= visual).all()), "candidates are image tokens"
    for b in range(B):
        kept = index[b][index[b] >= 0]
        n = int(candidates[b].sum())
        assert n == n_visual[b] if isinstance(n_visual, list) else n == n_visual
        assert int(candidates[b, kept].sum()) == math.ceil(0.25 * n)
        assert bool(visual[b, kept].sum() - candidates[b, kept].sum() == (visual[b] & ~candidates[b]).sum()), (
            "every image token that is not a candidate (an image newline) is kept"
        )
        top = probs[b].masked_fill(~candidates[b], -1).topk(math.ceil(0.25 * n)).indices
        assert set(top.tolist()) <= set(kept.tolist()), "the kept visual tokens are the top ones by probability"
        slots = index[b] >= 0
        for lay in range(K + 1):
            for part in ("keys", "values"):
                got = getattr(pruned.past_key_values.layers[lay], part)[b][:, slots]
                want = getattr(full_cache.layers[lay], part)[b].index_select(1, kept)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decoding_continues_at_the_original_positions(family):
    model, inputs, _, seed = family
    x = inputs(batch=2, text_lengths=[3, 6], seed=seed)
    adapter = hf.adapters.adapter_for(model)
    seen = []
    hook = adapter.text_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("position_ids")), with_kwargs=True
    )
    _generate(model, x, 3, min_new_tokens=3)  # an early end-of-sequence would cut the decode steps short
    stock = [p.clone() for p in seen[1:]]
    seen.clear()
    with hf.pruned(model, max_keep_ratio=0.25):
        _generate(model, x, 3, min_new_tokens=3)
    hook.remove()
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen[1:], stock)), (
        "decode positions = original last + 1, ..."
    )


@pytest.mark.parametrize("lengths", [[2, 5], [4, 4]], ids=["padded", "unpadded"])
def test_batch_with_unequal_keeps_equals_single_runs(family, lengths):
    # unpadded: generate() drops an all-ones mask, and the compacted rows still pad
    model, inputs, _, seed = family
    x = inputs(batch=2, text_lengths=lengths, seed=seed)
    with hf.pruned(model, threshold=None, max_keep_ratio=1.0) as handle:
        with torch.no_grad():
            model(**x)
        scores = handle.last_scores
    visual = x["input_ids"] == hf.adapters.adapter_for(model).image_token_id
    # A threshold in a wide gap between the middle scores of both samples (so that rounding
    # in padded vs unpadded runs cannot flip a token) at which their keep counts differ.
    ranked = scores[visual].sort().values
    n = len(ranked)
    candidates = [
        ((ranked[i + 1] - ranked[i]).item(), (ranked[i] + ranked[i + 1]).item() / 2) for i in range(n // 4, 3 * n // 4)
    ]
    threshold = next(
        t
        for gap, t in sorted(candidates, reverse=True)
        if int((scores[0][visual[0]] > t).sum()) != int((scores[1][visual[1]] > t).sum())
    )
    with hf.pruned(model, threshold=threshold, max_keep_ratio=1.0, min_keep=1) as handle:
        batch = _scored_generate(model, x)
        kept = handle.last_kept_visual.tolist()
        for b in range(2):
            rows = x["attention_mask"][b].bool()
            one = dict(
                x, input_ids=x["input_ids"][b : b + 1, rows], attention_mask=x["attention_mask"][b : b + 1, rows]
            )
            if "mm_token_type_ids" in x:
                one["mm_token_type_ids"] = x["mm_token_type_ids"][b : b + 1, rows]
            n_pix = x["pixel_values"].shape[0] // 2
            one["pixel_values"] = x["pixel_values"][b * n_pix : (b + 1) * n_pix]
            for key in ("image_grid_thw", "image_sizes"):
                if key in x:
                    one[key] = x[key][b : b + 1]
            single = _scored_generate(model, one)
            assert int(handle.last_kept_visual[0]) == kept[b]
            # Step by step while both runs chose the same token (a near-tie may flip greedy ids).
            for t, (want, got) in enumerate(zip(single.scores, batch.scores)):
                torch.testing.assert_close(got[b], want[0], rtol=1e-4, atol=1e-4, msg=f"sample {b} step {t}")
                if single.sequences[0, -4 + t] != batch.sequences[b, -4 + t]:
                    top2 = want[0].topk(2).values
                    assert float(top2[0] - top2[1]) < 1e-3, "ids differ without a near-tie"
                    break
    assert kept[0] != kept[1], kept


def _scored_generate(model, x, n=4):
    with torch.no_grad():
        return model.generate(
            **x, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True
        )


def test_sampling_runs_on_a_patched_model():
    model = testing.tiny_qwen2_5_vl()
    x = testing.qwen_inputs(batch=2, text_lengths=[2, 4])
    with hf.pruned(model, max_keep_ratio=0.1) as handle:
        out = model.generate(**x, max_new_tokens=3, do_sample=True, top_k=5)
        assert handle.last_kept_visual.tolist() == [2, 2]
    assert out.shape == (2, x["input_ids"].shape[1] + 3)


def test_errors():
    model = testing.tiny_qwen2_5_vl()
    handle = hf.apply_glimpse_prune(model)
    with pytest.raises(RuntimeError, match="already patched"):
        hf.apply_glimpse_prune(model)
    handle.remove()
    handle.remove()  # idempotent
    with pytest.raises(ValueError, match="layer must be in"):
        hf.apply_glimpse_prune(model, layer=5)
    with pytest.raises(ValueError, match="max_keep_ratio must be in"):
        hf.apply_glimpse_prune(model, max_keep_ratio=1.5)
    with pytest.raises(TypeError, match="unsupported model"):
        hf.apply_glimpse_prune(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="supports transformers 5.17 to 5.25, found 5.16.1"):
        require_transformers("5.16.1")
    with pytest.raises(RuntimeError, match="found 5.26.0"):
        require_transformers("5.26.0")
    assert require_transformers("5.17.0") == "5.17.0" and require_transformers("5.25.1") == "5.25.1"
    assert not hasattr(model, "_glimpse_ops_patch")


def test_env_reports_transformers_and_the_attention_implementations():
    """``python -m glimpse_ops.env`` names the installed transformers against the supported
    range, the implementations pruning runs under, and those apply_* refuses."""
    import transformers

    from glimpse_ops.env import env_report, hf_report

    report = hf_report()
    assert report in env_report()
    assert f"transformers {transformers.__version__} (supported:" in report
    supported, refused = report.split("attn_implementation ", 1)[1].split("; refused: ")
    supported = supported.removesuffix(" and kernels-hub flash kernels").split(", ")
    assert {"sdpa", "eager", "flash_attention_2", "flash_attention_3"} <= set(supported)
    assert "flex_attention" in refused.split(", ") and not set(supported) & set(refused.split(", "))
