"""Loading the public GlimpsePrune release's format (config.json + new_modules_gp.pt) on the tiny
HF Qwen2.5-VL: every config field that changes inference is honored or refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_close

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.glimpseprune.release import load_release, predictor_from_release  # noqa: E402
from glimpse_ops.hf import testing  # noqa: E402

K, VIT_LEVELS, WIDTH, COND, FUSE_HEADS = 3, (1, 0), 32, 32, 2

# (atol, rtol) by dtype: the same computation through two paths
TOLERANCES = {torch.float32: (1e-6, 1e-5)}


def release_config(**overrides) -> dict:
    """A config.json as the release writes it for this model (values the tiny model fits)."""
    config = {
        "selected_layers": [K],
        "reduce_layer": K,
        "selected_visual_layers": list(VIT_LEVELS),
        "attn_fuse_size": WIDTH,
        "visual_cond_size": COND,
        "attn_fuse_num_heads": FUSE_HEADS,
        "attn_fuse_global": True,
        "use_attention_logits": True,
        "deep_supervision": False,
        "ori_attn_supervision": False,
        "le_layers": list(range(6)),
        "rms_norm_eps": 1e-6,
        "reduce_threshold": 0.5,
    }
    config.update(overrides)
    return config


def release_modules(model, n_le_rows: int = 6, deep_supervision: bool = False) -> dict:
    """A module dict with the release's names and shapes (random values)."""
    text, vision = model.config.text_config, model.config.vision_config
    d, heads, vit = text.hidden_size, text.num_attention_heads, vision.hidden_size
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    levels = len(VIT_LEVELS)
    fuser = {"attn_in_proj.weight": r(WIDTH, heads), "attn_in_proj.bias": r(WIDTH)}
    for i in range(levels):
        fuser |= {
            f"cond_in_projs.{i}.weight": r(COND, vit),
            f"cond_in_projs.{i}.bias": r(COND),
            f"layers.{i}.norm1.weight": 1 + r(WIDTH),
            f"layers.{i}.norm2.weight": 1 + r(WIDTH),
            f"layers.{i}.attn.q_proj.weight": r(WIDTH + COND, WIDTH + COND),
            f"layers.{i}.attn.k_proj.weight": r(WIDTH + COND, WIDTH + COND),
            f"layers.{i}.attn.v_proj.weight": r(WIDTH, WIDTH),
            f"layers.{i}.attn.o_proj.weight": r(WIDTH, WIDTH),
            f"layers.{i}.mlp.gate_proj.weight": r(2 * WIDTH, WIDTH),
            f"layers.{i}.mlp.gate_proj.bias": r(2 * WIDTH),
            f"layers.{i}.mlp.up_proj.weight": r(2 * WIDTH, WIDTH),
            f"layers.{i}.mlp.up_proj.bias": r(2 * WIDTH),
            f"layers.{i}.mlp.down_proj.weight": r(WIDTH, 2 * WIDTH),
            f"layers.{i}.mlp.down_proj.bias": r(WIDTH),
        }
        if deep_supervision or i == levels - 1:
            fuser |= {f"attn_out_projs.{i}.weight": r(1, WIDTH), f"attn_out_projs.{i}.bias": r(1)}
    fuser["rotary_pos_emb.inv_freq"] = torch.rand((WIDTH + COND) // FUSE_HEADS // 4)  # a buffer: ignored
    return {
        "attn_fuser": fuser,
        "learnable_embeddings": r(n_le_rows, 1, d),
        "le_proj": {"weight": r(d, d), "bias": r(d)},
        "le_norm": {"weight": 1 + r(d)},
    }


def _write(folder, config: dict, modules: dict):
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(modules, folder / "new_modules_gp.pt")
    return folder


def test_the_release_format_loads_and_prunes(tmp_path):
    model = testing.tiny_qwen2_5_vl()
    modules = release_modules(model)
    predictor = load_release(_write(tmp_path, release_config(), modules), model)
    assert torch.equal(predictor.vip.layers[1].attn.q_proj.weight, modules["attn_fuser"]["layers.1.attn.q_proj.weight"])
    assert torch.equal(predictor.glimpse.learnable_embeddings, modules["learnable_embeddings"][: K + 1])
    assert torch.equal(predictor.glimpse.le_norm.weight, modules["le_norm"]["weight"])
    x = testing.qwen_inputs(batch=2, text_lengths=[2, 4])
    with hf.pruned(model, predictor=str(tmp_path), max_remain_ratio=0.25) as handle:
        out = model.generate(**x, max_new_tokens=3, do_sample=False)
        assert handle.settings.rule.threshold == 0.5 and handle.settings.rule.min_keep == 1
        assert all(1 <= k <= 4 for k in handle.last_kept_visual.tolist())
    assert out.shape == (2, x["input_ids"].shape[1] + 3)


def test_missing_keys_take_the_release_class_defaults():
    """The release's loader fills missing keys with its class defaults (its save_pretrained
    writes only what differs from them): attn_fuse_global then defaults to False, which is
    refused, and the keep rule to reduce_threshold 0.5 / min_remain_num 1 / no caps."""
    model = testing.tiny_qwen2_5_vl()
    modules = release_modules(model)
    config = release_config()
    del config["attn_fuse_global"]
    with pytest.raises(ValueError, match="attn_fuse_global=False is not supported"):
        predictor_from_release(config, modules, model)
    config = release_config()
    for key in ("rms_norm_eps", "reduce_threshold"):
        del config[key]
    predictor = predictor_from_release(config, modules, model)
    assert predictor.glimpse.le_norm.eps == 1e-5  # the release class's rms_norm_eps
    c = predictor.config
    assert (c.reduce_threshold, c.min_remain_num, c.max_remain_ratio, c.fixed_remain_ratio) == (0.5, 1, None, None)


@pytest.mark.parametrize(
    "field,value,detail",
    [
        ("attn_fuse_global", False, "supports True only"),
        ("attn_fuse_type", "AttnFuserV2", "supports 'AttnFuserV1' only"),
        ("attn_fuse_hidden_act", "gelu", "supports 'silu' only"),
        ("le_length", 2, "supports 1 only"),
        ("le_norm_type", "layernorm", "supports 'rmsnorm' only"),
        ("use_ref_masks", True, "supports False only"),
        ("use_zero_masks", True, "supports False only"),
        ("reduce_layer", K + 1, f"after the score layer {K}"),
        ("selected_layers", [2, 3], "one score layer"),
        ("selected_layers", [5], r"in \[0, 5\)"),
        ("le_layers", [1, 2, 3], "including 0"),
        ("le_layers", [0, 0, 1], "distinct layers"),
        ("le_layers", [0, 6], r"in \[0, 6\)"),
        ("selected_visual_layers", [], "at least one ViT level"),
        ("num_attention_heads", 8, "the model has 4"),
        ("max_remain_ratio", 1.5, r"\(0, 1\]"),
        ("fixed_remain_ratio", 0.0, r"\(0, 1\]"),
        ("anchor_positions", ["tl"], "no forced corner tokens"),
    ],
)
def test_fields_the_code_cannot_honor_are_refused(field, value, detail):
    model = testing.tiny_qwen2_5_vl()
    pattern = rf"glimpse_ops.glimpseprune.load_release: the release's {field}=.* is not supported \(.*{detail}"
    with pytest.raises(ValueError, match=pattern):
        predictor_from_release(release_config(**{field: value}), release_modules(model), model)


def test_le_layers_choose_the_rows_and_the_layers_they_are_added_before():
    model = testing.tiny_qwen2_5_vl()
    modules = release_modules(model, n_le_rows=3)
    predictor = predictor_from_release(release_config(le_layers=[0, 2, 5]), modules, model)
    assert predictor.glimpse_layers == (0, 2)  # layer 5 is after the score layer: never reached
    assert torch.equal(predictor.glimpse.learnable_embeddings, modules["learnable_embeddings"][:2])
    assert predictor.row_for_layer(1) is None and predictor.row_for_layer(3) is None
    layers = hf.adapters.adapter_for(model).layers
    seen = {}
    x = testing.qwen_inputs(batch=1)
    with hf.pruned(model, predictor=predictor, fixed_keep_ratio=1.0):
        # registered after the patch's own hooks: they see what the layers really get
        hooks = [layers[i].register_forward_hook(_tap(seen, f"out{i}")) for i in (0, 1)]
        hooks += [layers[i].register_forward_pre_hook(_tap(seen, f"in{i}"), with_kwargs=True) for i in (1, 2)]
        with torch.no_grad():
            model(**x)
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        row2 = predictor.row_for_layer(2)[0]
    assert torch.equal(seen["in1"], seen["out0"]), "no row for layer 1: nothing is added"
    assert_close("glimpse into layer 2", seen["in2"], seen["out1"] + row2, TOLERANCES[torch.float32])


def _tap(seen: dict, name: str):
    def hook(module, args, *rest):
        if name.startswith("out"):
            output = rest[-1]
            hidden = output[0] if isinstance(output, tuple) else output
        else:
            hidden = args[0] if args else rest[0]["hidden_states"]
        seen.setdefault(name, hidden[0, -1].detach().clone())  # the prefill's glimpse row

    return hook


def test_use_attention_logits_false_feeds_the_vip_log_softmax_scores():
    """log-softmax differs from the raw logits by one constant per (sample, head): the VIP's
    inputs under both settings must differ exactly so."""
    model = testing.tiny_qwen2_5_vl()
    modules = release_modules(model)
    x = testing.qwen_inputs(batch=2, text_lengths=[2, 5])
    inputs = {}
    for raw in (True, False):
        predictor = predictor_from_release(release_config(use_attention_logits=raw), modules, model)
        with hf.pruned(model, predictor=predictor, fixed_keep_ratio=0.5) as handle:
            hook = handle.predictor.vip.register_forward_pre_hook(
                lambda m, a, raw=raw: inputs.update({raw: a[0].clone()})  # returns None: args unchanged
            )
            with torch.no_grad():
                model(**x)
            hook.remove()
    shift = (inputs[True] - inputs[False]).view(2, 16, -1)  # [B, Nv, H]
    assert bool((shift > 0).all()), "log-softmax lies below the logits"
    assert_close("per (sample, head) constant", shift, shift[:, :1].expand_as(shift), (1e-5, 1e-5))


def test_deep_supervision_heads_do_not_run_at_inference():
    model = testing.tiny_qwen2_5_vl()
    modules = release_modules(model)
    heads = release_modules(model, deep_supervision=True)["attn_fuser"]
    first_head = {k: v for k, v in heads.items() if k.startswith("attn_out_projs.0.")}
    deep = dict(modules, attn_fuser=dict(modules["attn_fuser"], **first_head))
    assert "attn_out_projs.0.weight" in deep["attn_fuser"]
    plain = predictor_from_release(release_config(), modules, model)
    supervised = predictor_from_release(release_config(deep_supervision=True), deep, model)
    for (name, a), (_, b) in zip(plain.state_dict().items(), supervised.state_dict().items()):
        assert torch.equal(a, b), name


def test_keep_rule_defaults_come_from_the_release():
    model = testing.tiny_qwen2_5_vl()
    modules = release_modules(model)
    config = release_config(reduce_threshold=0.7, max_remain_ratio=0.5, min_remain_num=2, rms_norm_eps=1e-5)
    predictor = predictor_from_release(config, modules, model)
    assert predictor.glimpse.le_norm.eps == 1e-5
    with hf.pruned(model, predictor=predictor) as handle:
        r = handle.settings.rule
        assert (r.threshold, r.max_remain_ratio, r.min_keep, r.fixed_keep_ratio) == (0.7, 0.5, 2, None)
    with hf.pruned(model, predictor=predictor, threshold=0.6, min_keep=0) as handle:
        r = handle.settings.rule
        assert (r.threshold, r.max_remain_ratio, r.min_keep) == (0.6, 0.5, 0)
    fixed = predictor_from_release(release_config(fixed_remain_ratio=0.25), modules, model)
    with hf.pruned(model, predictor=fixed) as handle:
        assert handle.settings.rule.fixed_keep_ratio == 0.25
    with hf.pruned(model, predictor=fixed, threshold=0.6) as handle:  # an explicit rule replaces the fixed share
        assert handle.settings.rule.fixed_keep_ratio is None and handle.settings.rule.threshold == 0.6


def test_release_module_errors():
    model = testing.tiny_qwen2_5_vl()
    modules = release_modules(model)
    del modules["le_norm"]
    with pytest.raises(ValueError, match="the release's modules lack 'le_norm'"):
        predictor_from_release(release_config(), modules, model)
    with pytest.raises(ValueError, match="learnable_embeddings has 4 rows, le_layers lists 6"):
        predictor_from_release(release_config(), release_modules(model, n_le_rows=4), model)
