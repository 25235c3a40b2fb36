"""GlimpsePrune+ release folders (a LoRA adapter with transformers 4.51's module names beside the
glimpse modules) on the tiny HF Qwen2.5-VL: refused without the adapter, merged with it, and
written out as a merged checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")  # CI installs it: the README test command
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402
from test_hf_release import _write, release_config, release_modules  # noqa: E402

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.hf import testing  # noqa: E402
from glimpse_ops.hf.lora import PREFIX, apply_lora, read_adapter  # noqa: E402


def _release(tmp_path, seed: int):
    """A GP+ release folder for the tiny Qwen2.5-VL of ``seed``, its adapter written with the
    4.51 names (``model.layers.N``), as the official stage 1 saved it."""
    model = testing.tiny_qwen2_5_vl(seed=seed)
    folder = tmp_path / "release"
    folder.mkdir()
    _write(folder, release_config(), release_modules(model))
    handle = apply_lora(model, r=4, alpha=8, dropout=0.0, seed=seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    handle.save(folder)
    old = {k.replace(PREFIX + "model.language_model.layers.", PREFIX + "model.layers."): v
           for k, v in handle.state_dict().items()}  # fmt: skip
    save_file(old, str(folder / "adapter_model.safetensors"))
    return folder


def _pruned_logits(model, x, **kwargs):
    with hf.pruned(model, **kwargs) as handle, torch.no_grad():
        return model(**x).logits[:, -1], handle.last_kept_visual.clone()


def test_a_release_is_refused_without_its_adapter_and_prunes_with_it_merged(tmp_path, seed):
    folder = _release(tmp_path, seed % 1000)
    x = testing.qwen_inputs(batch=2, text_lengths=[2, 5], seed=seed)
    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    with pytest.raises(ValueError, match=r"GlimpsePrune\+ release.*issue #7.*adapter='merge'"):
        hf.apply_glimpse_prune(model, predictor=str(folder))
    got = _pruned_logits(model, x, predictor=str(folder), adapter="merge")
    # by hand: the adapter merged, then the glimpse modules alone
    by_hand = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    read_adapter(by_hand, folder).merge()
    modules_only = tmp_path / "modules"
    modules_only.mkdir()
    for name in ("config.json", "new_modules_gp.pt"):
        shutil.copy2(folder / name, modules_only / name)
    want = _pruned_logits(by_hand, x, predictor=str(modules_only))
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(got[1], want[1])
    again = _pruned_logits(by_hand, x, predictor=str(folder), adapter="merged")  # already merged: no second merge
    torch.testing.assert_close(again[0], want[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="already merged into this model.*adapter='merged'"):
        hf.apply_glimpse_prune(model, predictor=str(folder), adapter="merge")  # remove() did not unmerge
    torch.testing.assert_close(_pruned_logits(model, x, predictor=str(folder), adapter="merged")[0], got[0])
    from glimpse_ops.glimpseprune import load_predictor

    with pytest.raises(ValueError, match="GlimpsePrune\\+ release.*python -m glimpse_ops.hf.gp_plus"):
        load_predictor(str(folder), model)  # what the vLLM plugin and the train command call
    unmerged = _pruned_logits(testing.tiny_qwen2_5_vl(seed=seed % 1000), x, predictor=str(modules_only))
    assert (unmerged[0] - want[0]).abs().max() > 1e-4, "the adapter matters"


def test_a_release_missing_a_file_is_refused_by_name(tmp_path, seed):
    folder = _release(tmp_path, seed % 1000)
    (folder / "adapter_model.safetensors").unlink()
    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    with pytest.raises(FileNotFoundError, match="has adapter_config.json but no adapter_model.safetensors"):
        hf.apply_glimpse_prune(model, predictor=str(folder), adapter="merge")
    with pytest.raises(ValueError, match="adapter must be None, 'merge' or 'merged'"):
        hf.apply_glimpse_prune(model, predictor=str(folder), adapter="yes")
    with pytest.raises(FileNotFoundError, match="is no GlimpsePrune\\+ release: it has no adapter_model.safetensors"):
        hf.gp_plus.check_release(folder)


@pytest.mark.slow
def test_the_command_writes_a_merged_checkpoint_that_prunes_like_the_in_memory_merge(tmp_path, seed):
    folder = _release(tmp_path, 0)
    base = testing.tiny_qwen2_5_vl(seed=0)
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "merged"
    command = [sys.executable, "-m", "glimpse_ops.hf.gp_plus", "--model", str(tmp_path / "base"),
               "--release", str(folder), "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "glimpse" / "new_modules_gp.pt").is_file() and not (out / "glimpse" / "adapter_config.json").exists()
    from transformers import Qwen2_5_VLForConditionalGeneration

    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    x = testing.qwen_inputs(batch=2, text_lengths=[2, 5], seed=seed)
    got = _pruned_logits(merged, x, predictor=str(out / "glimpse"))
    in_memory = _pruned_logits(testing.tiny_qwen2_5_vl(seed=0), x, predictor=str(folder), adapter="merge")
    torch.testing.assert_close(got[0], in_memory[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], in_memory[1])
