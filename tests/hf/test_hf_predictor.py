"""GlimpsePrune with a trained glimpse token + VIP on the tiny HF Qwen2.5-VL and Qwen3-VL (random
weights)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, centered_predictor

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.glimpseprune.predictor import GlimpsePredictor, window_index  # noqa: E402
from glimpse_ops.hf import testing  # noqa: E402

K, VIT_LEVELS = 3, (1, 0)
SIZES = dict(width=32, cond=32, fuse_heads=2)

# (atol, rtol) by dtype: logits of the same prompt, and of a padded batch against single runs
TOLERANCES = {torch.float32: (1e-5, 1e-5)}
LOGIT_TOLERANCES = {torch.float32: (1e-4, 1e-4)}


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def setup(seed, request):
    build = {"qwen2_5_vl": testing.tiny_qwen2_5_vl, "qwen3_vl": testing.tiny_qwen3_vl}[request.param]
    model = build(seed=seed % 1000)
    torch.manual_seed(seed)
    predictor = GlimpsePredictor.for_model(model, K, VIT_LEVELS, **SIZES)
    return model, predictor, seed


def _single(x: dict, b: int) -> dict:
    rows = x["attention_mask"][b].bool()
    n_pix = x["pixel_values"].shape[0] // x["input_ids"].shape[0]
    return dict(
        x,
        input_ids=x["input_ids"][b : b + 1, rows],
        attention_mask=x["attention_mask"][b : b + 1, rows],
        mm_token_type_ids=x["mm_token_type_ids"][b : b + 1, rows],
        pixel_values=x["pixel_values"][b * n_pix : (b + 1) * n_pix],
        image_grid_thw=x["image_grid_thw"][b : b + 1],
    )


def test_keep_everything_with_a_predictor_matches_the_stock_model(setup):
    model, predictor, seed = setup
    x = testing.qwen_inputs(batch=2, text_lengths=[3, 6], seed=seed)
    with torch.no_grad():
        want = model(**x).logits[:, -1]
        want_ids = model.generate(**x, max_new_tokens=4, do_sample=False)
    with hf.pruned(model, predictor=predictor, fixed_keep_ratio=1.0) as handle:
        with torch.no_grad():
            got = model(**x).logits[:, -1]
            ids = model.generate(**x, max_new_tokens=4, do_sample=False)
        assert handle.last_kept_visual.tolist() == [16, 16]
    assert_close("logits", got, want, TOLERANCES[torch.float32])
    assert torch.equal(ids, want_ids), "the glimpse is dropped before anything attends to it"


def test_batch_with_unequal_keeps_equals_single_runs(setup):
    model, predictor, seed = setup
    x = testing.qwen_inputs(batch=2, text_lengths=[2, 5], seed=seed)
    with hf.pruned(model, predictor=predictor, fixed_keep_ratio=1.0) as handle:
        with torch.no_grad():
            model(**x)
        probs = handle.last_scores[x["input_ids"] == testing.IMAGE].view(2, -1)
    ranked = probs.flatten().sort().values
    gaps = ranked[9:23] - ranked[8:22]
    at = 8 + int(gaps.argmax())
    threshold = float(ranked[at] + ranked[at + 1]) / 2  # in a wide gap: rounding cannot flip a token
    with hf.pruned(model, predictor=predictor, threshold=threshold) as handle:
        with torch.no_grad():
            batch = model(**x).logits[:, -1]
            kept = handle.last_kept_visual.tolist()
            assert kept == [int((probs[b] > threshold).sum().clamp(min=1)) for b in range(2)]
            for b in range(2):
                one = model(**_single(x, b)).logits[0, -1]
                assert int(handle.last_kept_visual[0]) == kept[b]
                assert_close(f"logits[{b}]", batch[b], one, LOGIT_TOLERANCES[torch.float32])


def test_the_cap_keeps_the_top_tokens(setup):
    model, predictor, seed = setup
    x = testing.qwen_inputs(batch=1, seed=seed)
    with hf.pruned(model, predictor=predictor, fixed_keep_ratio=1.0) as handle:
        with torch.no_grad():
            model(**x)
        probs = handle.last_scores[0]
    with hf.pruned(model, predictor=predictor, threshold=0.0, max_remain_ratio=0.25) as handle:
        with torch.no_grad():
            model(**x)
        kept = handle.last_index[0]
    visual = x["input_ids"][0] == testing.IMAGE
    kept_visual = sorted(int(i) for i in kept if visual[i])
    assert kept_visual == sorted(probs.masked_fill(~visual, -1).topk(4).indices.tolist())  # floor(0.25 * 16)


def test_save_and_load_round_trip(setup, tmp_path):
    model, predictor, seed = setup
    path = tmp_path / "glimpse.safetensors"
    predictor.save(path)
    x = testing.qwen_inputs(batch=2, text_lengths=[2, 4], seed=seed)
    results = []
    for p in (predictor, str(path)):
        with hf.pruned(model, predictor=p, fixed_keep_ratio=0.5) as handle:
            with torch.no_grad():
                results.append((model(**x).logits, handle.last_index))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_window_index_matches_transformers():
    import transformers.vision_utils as vision_utils

    if not hasattr(vision_utils, "get_vision_window_index"):
        pytest.skip("this transformers version keeps the window index on the ViT")
    for grid, window, patch in ([[1, 8, 8], [1, 12, 20]], 8, 2), ([[1, 64, 36]], 112, 14), ([[1, 4, 4]], 112, 14):
        grid = torch.tensor(grid)
        assert torch.equal(
            window_index(grid, 2, window, patch), vision_utils.get_vision_window_index(grid, 2, window, patch)[0]
        )


def release_keep(prob, threshold=0.5, max_ratio=None, min_num=1, fixed_ratio=None):
    """The release's keep rule for one row of probabilities (per sample in its release commit,
    per image later), written out as the release writes it."""
    n = prob.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if fixed_ratio is not None:
        mask[prob.topk(max(1, min(n, int(fixed_ratio * n)))).indices] = True
        return mask
    mask = prob > threshold
    if max_ratio is not None:
        max_k = max(1, min(n, int(max_ratio * n)))
        if int(mask.sum()) > max_k:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[prob.topk(max_k).indices] = True
    if min_num is not None and int(mask.sum()) < min_num:
        mask[prob.topk(max(1, min(n, min_num))).indices] = True
    return mask


def _release_arguments(rule: dict) -> dict:
    """apply_glimpse_prune's keep-rule arguments -> release_keep's, with the release defaults."""
    return dict(
        threshold=rule.get("threshold", 0.5),
        max_ratio=rule.get("max_remain_ratio"),
        min_num=rule.get("min_keep", 1),
        fixed_ratio=rule.get("fixed_keep_ratio"),
    )


def _kept_visual(handle, x) -> list[torch.Tensor]:
    """Per sample: bool over its visual tokens in prompt order, True where the prune kept it."""
    visual = x["input_ids"] == testing.IMAGE
    out = []
    for b in range(visual.shape[0]):
        kept = torch.zeros(visual.shape[1], dtype=torch.bool)
        index = handle.last_index[b]
        kept[index[index >= 0]] = True
        out.append(kept[visual[b]])
    return out


@pytest.mark.parametrize(
    "rule",
    [
        dict(),  # the release's defaults: sigmoid > 0.5, at least 1
        dict(max_remain_ratio=0.9),  # the threshold binds before the cap
        dict(max_remain_ratio=0.2),  # the cap binds
        dict(threshold=0.7, min_keep=5),
        dict(fixed_keep_ratio=0.3),
    ],
    ids=["defaults", "cap-0.9", "cap-0.2", "min-keep", "fixed"],
)
def test_keep_rule_is_the_release_rule_per_sample(setup, rule):
    model, predictor, seed = setup
    x = testing.qwen_inputs(batch=2, text_lengths=[3, 5], seed=seed)
    predictor = centered_predictor(model, predictor, x)
    with hf.pruned(model, predictor=predictor, **rule) as handle:
        with torch.no_grad():
            model(**x)
        probs = handle.last_scores[x["input_ids"] == testing.IMAGE].view(2, -1)
        kept = _kept_visual(handle, x)
    expected_rule = _release_arguments(rule)
    for b in range(2):
        want = release_keep(probs[b], **expected_rule)
        assert torch.equal(kept[b], want), f"sample {b}: kept {kept[b].nonzero().flatten().tolist()}"
    if rule == dict(max_remain_ratio=0.9):
        assert any(int(k.sum()) < int(0.9 * 16) for k in kept), "the threshold, not the cap, decides here"


MULTI_IMAGE = [[(8, 8), (4, 8)], [(4, 4), (8, 8)]]  # 16 + 8 and 4 + 16 visual tokens


@pytest.mark.parametrize("caps_per", ["sample", "image"])
@pytest.mark.parametrize(
    "rule", [dict(max_remain_ratio=0.3), dict(fixed_keep_ratio=0.25), dict(threshold=0.8, min_keep=3)]
)
def test_multi_image_caps_per_sample_or_per_image(setup, caps_per, rule):
    model, predictor, seed = setup
    x = testing.qwen_image_inputs(MULTI_IMAGE, text_lengths=[3, 5], seed=seed)
    predictor = centered_predictor(model, predictor, x)
    with hf.pruned(model, predictor=predictor, caps_per=caps_per, **rule) as handle:
        with torch.no_grad():
            ids = model.generate(**x, max_new_tokens=2, do_sample=False)
        visual = x["input_ids"] == testing.IMAGE
        probs = [handle.last_scores[b][visual[b]] for b in range(2)]
        kept = _kept_visual(handle, x)
    expected_rule = _release_arguments(rule)
    for b, sizes in enumerate(MULTI_IMAGE):
        if caps_per == "sample":
            want = release_keep(probs[b], **expected_rule)
        else:
            rows = probs[b].split([h * w // 4 for h, w in sizes])
            want = torch.cat([release_keep(row, **expected_rule) for row in rows])
        assert torch.equal(kept[b], want), f"sample {b} ({caps_per})"
    assert ids.shape == (2, x["input_ids"].shape[1] + 2)


def test_per_image_and_per_sample_caps_differ_where_the_release_versions_do(setup):
    """One sample, two images whose tokens score very differently: a per-sample cap may take
    all of its tokens from one image, a per-image cap takes its share from each."""
    model, predictor, seed = setup
    x = testing.qwen_image_inputs([MULTI_IMAGE[0]], text_lengths=[3], seed=seed)
    predictor = centered_predictor(model, predictor, x)
    kept = {}
    for caps_per in ("sample", "image"):
        with hf.pruned(model, predictor=predictor, fixed_keep_ratio=0.25, caps_per=caps_per) as handle:
            with torch.no_grad():
                model(**x)
            kept[caps_per] = _kept_visual(handle, x)[0]
    assert int(kept["image"][:16].sum()) == 4 and int(kept["image"][16:].sum()) == 2  # floor(0.25 * 16), * 8
    assert int(kept["sample"].sum()) == 6  # floor(0.25 * 24)


def test_predictor_errors(setup, tmp_path):
    model, predictor, _ = setup
    with pytest.raises(ValueError, match="trained for layer 3"):
        hf.apply_glimpse_prune(model, predictor=predictor, layer=2)
    with pytest.raises(ValueError, match="predictor must be"):
        hf.apply_glimpse_prune(model, predictor=str(tmp_path / "missing.safetensors"))
    with pytest.raises(TypeError, match="needs Qwen2.5-VL"):
        hf.apply_glimpse_prune(testing.tiny_llava(), predictor=predictor)
    with pytest.raises(ValueError, match="caps_per must be 'sample' or 'image', got 'batch'"):
        hf.apply_glimpse_prune(model, predictor=predictor, caps_per="batch")
    with pytest.raises(ValueError, match="fixed_keep_ratio keeps a fixed share"):
        hf.apply_glimpse_prune(model, predictor=predictor, fixed_keep_ratio=0.2, threshold=0.5)
    with pytest.raises(ValueError, match=r"fixed_keep_ratio must be in \(0, 1\], got 0"):
        hf.apply_glimpse_prune(model, predictor=predictor, fixed_keep_ratio=0)
    with pytest.raises(ValueError, match="predictor_dtype must be a floating torch.dtype or 'model'"):
        hf.apply_glimpse_prune(model, predictor=predictor, predictor_dtype=torch.int8)
    for option in (dict(fixed_keep_ratio=0.1), dict(caps_per="image"), dict(predictor_dtype="model")):
        with pytest.raises(ValueError, match=f"{next(iter(option))} applies with a predictor only"):
            hf.apply_glimpse_prune(model, **option)
    assert not hasattr(model, "_glimpse_ops_patch")


def test_a_saved_predictor_loads_exactly_under_another_default_dtype(tmp_path):
    """vLLM builds its model under the model's dtype: a predictor file loaded there must not be
    rounded through bf16 parameters."""
    from glimpse_ops.glimpseprune import load_predictor

    model = testing.tiny_qwen2_5_vl()
    predictor = GlimpsePredictor.for_model(model, K, VIT_LEVELS, **SIZES)
    path = tmp_path / "p.safetensors"
    predictor.save(path)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        loaded = load_predictor(str(path), model)
    finally:
        torch.set_default_dtype(previous)
    for (name, want), got in zip(predictor.state_dict().items(), loaded.state_dict().values()):
        assert got.dtype == torch.float32 and torch.equal(got, want), name
