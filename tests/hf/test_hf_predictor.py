"""GlimpsePrune with a trained glimpse token + VIP on the tiny HF Qwen2.5-VL (random weights)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.hf import testing  # noqa: E402
from glimpse_ops.hf.predictor import GlimpsePredictor, window_index  # noqa: E402

K, VIT_LEVELS = 3, (1, 0)
SIZES = dict(width=32, cond=32, fuse_heads=2)


@pytest.fixture
def setup(seed):
    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
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
    with hf.pruned(model, predictor=predictor, threshold=None, max_keep_ratio=1.0) as handle:
        with torch.no_grad():
            got = model(**x).logits[:, -1]
            ids = model.generate(**x, max_new_tokens=4, do_sample=False)
        assert handle.last_kept_visual.tolist() == [16, 16]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, want_ids), "the glimpse is dropped before anything attends to it"


def test_batch_with_unequal_keeps_equals_single_runs(setup):
    model, predictor, seed = setup
    x = testing.qwen_inputs(batch=2, text_lengths=[2, 5], seed=seed)
    with hf.pruned(model, predictor=predictor, threshold=None, max_keep_ratio=1.0) as handle:
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
                torch.testing.assert_close(batch[b], one, rtol=1e-4, atol=1e-4)


def test_the_cap_keeps_the_top_tokens(setup):
    model, predictor, seed = setup
    x = testing.qwen_inputs(batch=1, seed=seed)
    with hf.pruned(model, predictor=predictor, threshold=None, max_keep_ratio=1.0) as handle:
        with torch.no_grad():
            model(**x)
        probs = handle.last_scores[0]
    with hf.pruned(model, predictor=predictor, threshold=0.0, max_keep_ratio=0.25) as handle:
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
        with hf.pruned(model, predictor=p, threshold=None, max_keep_ratio=0.5) as handle:
            with torch.no_grad():
                results.append((model(**x).logits, handle.last_index))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _release_modules(model, n_le_rows: int, width: int, cond: int, levels: int) -> dict:
    """A state dict with the public GlimpsePrune release's names and shapes (random values)."""
    d, heads, vit = (
        model.config.text_config.hidden_size,
        model.config.text_config.num_attention_heads,
        model.config.vision_config.hidden_size,
    )
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    fuser = {"attn_in_proj.weight": r(width, heads), "attn_in_proj.bias": r(width)}
    for i in range(levels):
        fuser |= {
            f"cond_in_projs.{i}.weight": r(cond, vit),
            f"cond_in_projs.{i}.bias": r(cond),
            f"layers.{i}.norm1.weight": 1 + r(width),
            f"layers.{i}.norm2.weight": 1 + r(width),
            f"layers.{i}.attn.q_proj.weight": r(width + cond, width + cond),
            f"layers.{i}.attn.k_proj.weight": r(width + cond, width + cond),
            f"layers.{i}.attn.v_proj.weight": r(width, width),
            f"layers.{i}.attn.o_proj.weight": r(width, width),
            f"layers.{i}.mlp.gate_proj.weight": r(2 * width, width),
            f"layers.{i}.mlp.gate_proj.bias": r(2 * width),
            f"layers.{i}.mlp.up_proj.weight": r(2 * width, width),
            f"layers.{i}.mlp.up_proj.bias": r(2 * width),
            f"layers.{i}.mlp.down_proj.weight": r(width, 2 * width),
            f"layers.{i}.mlp.down_proj.bias": r(width),
        }
    qk_head_dim = (width + cond) // SIZES["fuse_heads"]
    fuser |= {
        f"attn_out_projs.{levels - 1}.weight": r(1, width),
        f"attn_out_projs.{levels - 1}.bias": r(1),
        "rotary_pos_emb.inv_freq": torch.rand(qk_head_dim // 4),
    }  # a buffer some versions save: ignored
    return {
        "attn_fuser": fuser,
        "learnable_embeddings": r(n_le_rows, 1, d),
        "le_proj": {"weight": r(d, d), "bias": r(d)},
        "le_norm": {"weight": 1 + r(d)},
    }


def test_the_release_format_loads_and_prunes(tmp_path):
    model = testing.tiny_qwen2_5_vl()
    modules = _release_modules(model, n_le_rows=6, width=32, cond=32, levels=2)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "selected_layers": [K],
                "selected_visual_layers": list(VIT_LEVELS),
                "attn_fuse_size": 32,
                "visual_cond_size": 32,
                "attn_fuse_num_heads": 2,
                "reduce_threshold": 0.5,
            }
        )
    )
    torch.save(modules, tmp_path / "new_modules_gp.pt")
    predictor = GlimpsePredictor.from_release(tmp_path, model)
    assert torch.equal(predictor.vip.layers[1].attn.q_proj.weight, modules["attn_fuser"]["layers.1.attn.q_proj.weight"])
    assert torch.equal(predictor.glimpse.learnable_embeddings, modules["learnable_embeddings"][: K + 1])
    assert torch.equal(predictor.glimpse.le_norm.weight, modules["le_norm"]["weight"])
    x = testing.qwen_inputs(batch=2, text_lengths=[2, 4])
    with hf.pruned(model, predictor=str(tmp_path), max_keep_ratio=0.25) as handle:
        out = model.generate(**x, max_new_tokens=3, do_sample=False)
        assert all(1 <= k <= 4 for k in handle.last_kept_visual.tolist())
    assert out.shape == (2, x["input_ids"].shape[1] + 3)


def test_predictor_errors(setup, tmp_path):
    model, predictor, _ = setup
    with pytest.raises(ValueError, match="trained for layer 3"):
        hf.apply_glimpse_prune(model, predictor=predictor, layer=2)
    with pytest.raises(ValueError, match="predictor must be"):
        hf.apply_glimpse_prune(model, predictor=str(tmp_path / "missing.safetensors"))
    with pytest.raises(TypeError, match="needs Qwen2.5-VL"):
        hf.apply_glimpse_prune(testing.tiny_llava(), predictor=predictor)
    (tmp_path / "config.json").write_text(json.dumps({"selected_layers": [2, 3], "selected_visual_layers": [1]}))
    torch.save({}, tmp_path / "new_modules_gp.pt")
    with pytest.raises(ValueError, match="one score layer"):
        GlimpsePredictor.from_release(tmp_path, model)
    assert not hasattr(model, "_glimpse_ops_patch")


def test_window_index_matches_transformers():
    import transformers.vision_utils as vision_utils

    if not hasattr(vision_utils, "get_vision_window_index"):
        pytest.skip("this transformers version keeps the window index on the ViT")
    for grid, window, patch in ([[1, 8, 8], [1, 12, 20]], 8, 2), ([[1, 64, 36]], 112, 14), ([[1, 4, 4]], 112, 14):
        grid = torch.tensor(grid)
        assert torch.equal(
            window_index(grid, 2, window, patch), vision_utils.get_vision_window_index(grid, 2, window, patch)[0]
        )
