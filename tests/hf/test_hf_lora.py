"""glimpse_ops.hf.lora (peft's LoRA injected into the LLM in place) on tiny HF models."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")  # CI installs it: the README test command
peft = pytest.importorskip("peft")  # and peft

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.hf import testing  # noqa: E402
from glimpse_ops.hf.lora import PREFIX, apply_lora, map_adapter_names, read_adapter  # noqa: E402

FAMILIES = {
    "qwen2_5_vl": (testing.tiny_qwen2_5_vl, testing.qwen_inputs),
    "llava": (testing.tiny_llava, testing.llava_inputs),
}


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits[:, -1]


def _train_a_little(handle, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(params=list(FAMILIES))
def setup(request, seed):
    build, inputs = FAMILIES[request.param]
    return build, build(seed=seed % 1000), inputs(batch=2, text_lengths=[2, 5], seed=seed), seed


def test_lora_targets_the_llm_linears_and_switches_off(setup):
    _, model, x, seed = setup
    stock = _logits(model, x)
    handle = apply_lora(model, r=4, alpha=8, dropout=0.0, seed=seed)
    n_layers = len(hf.adapters.adapter_for(model).layers)
    assert len(handle.targets) == 7 * n_layers and all(".layers." in t for t in handle.targets)
    assert not any("visual" in t or "vision" in t or "lm_head" in t for t in handle.targets)
    torch.testing.assert_close(_logits(model, x), stock, rtol=0, atol=0)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    _train_a_little(handle, seed)
    adapted = _logits(model, x)
    assert (adapted - stock).abs().max() > 1e-4
    with handle.disabled():
        torch.testing.assert_close(_logits(model, x), stock, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, x), adapted, rtol=0, atol=0)
    assert all(p.requires_grad for p in handle.parameters()), "switching off does not touch requires_grad"
    with hf.pruned(model, max_keep_ratio=0.25) as pruning:  # the hooks still find the plain HF instance
        with torch.no_grad():
            model.generate(**x, max_new_tokens=2, do_sample=False)
        assert pruning.last_kept_visual is not None
    handle.remove()
    torch.testing.assert_close(_logits(model, x), stock, rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters()), "remove() restores requires_grad"


def test_merge_folds_alpha_over_r_times_b_a_into_the_weights(setup):
    _, model, x, seed = setup
    name = hf.lora.llm_linear_names(model)[0]
    before = model.get_submodule(name).weight.detach().clone()
    handle = apply_lora(model, r=4, alpha=8, dropout=0.0, seed=seed)
    _train_a_little(handle, seed)
    adapted = _logits(model, x)
    layer = handle.named_layers()[name]
    delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    handle.merge()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    torch.testing.assert_close(model.get_submodule(name).weight, before + delta)
    torch.testing.assert_close(_logits(model, x), adapted, rtol=1e-5, atol=1e-5)


def test_save_and_read_round_trip_and_peft_reads_the_files(setup, tmp_path):
    build, model, x, seed = setup
    handle = apply_lora(model, r=4, alpha=8, dropout=0.0, seed=seed)
    _train_a_little(handle, seed)
    adapted = _logits(model, x)
    handle.save(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4
    fresh = build(seed=seed % 1000)
    read_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh, x), adapted, rtol=1e-6, atol=1e-6)
    other = build(seed=seed % 1000)
    wrapped = peft.PeftModel.from_pretrained(other, str(tmp_path))  # peft's own loader, same files
    torch.testing.assert_close(_logits(wrapped, x), adapted, rtol=1e-6, atol=1e-6)


def test_an_adapter_with_transformers_4_names_maps_onto_5(setup, tmp_path):
    """The official release was trained on transformers 4.51: Qwen's LLM was ``model.layers``,
    LLaVA's ``language_model.model.layers``; 5.x has both under ``model.language_model``."""
    from safetensors.torch import save_file

    build, model, x, seed = setup
    handle = apply_lora(model, r=4, alpha=8, dropout=0.0, seed=seed)
    _train_a_little(handle, seed)
    adapted = _logits(model, x)
    old = "model.layers." if model.config.model_type.startswith("qwen") else "language_model.model.layers."
    weights = {
        k.replace(PREFIX + "model.language_model.layers.", PREFIX + old): v for k, v in handle.state_dict().items()
    }
    assert all(k.startswith(PREFIX + old) for k in weights)
    handle.save(tmp_path)
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    fresh = build(seed=seed % 1000)
    names = map_adapter_names(list(weights), fresh)
    assert set(names.values()) == set(handle.targets)
    read_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh, x), adapted, rtol=1e-6, atol=1e-6)


def test_bad_adapters_are_refused(tmp_path, seed):
    from safetensors.torch import save_file

    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        read_adapter(model, tmp_path)
    handle = apply_lora(model, r=2, alpha=4)
    handle.save(tmp_path)
    handle.remove()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="not supported: use_dora"):
        read_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({PREFIX + "model.visual.blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 32)},
              str(tmp_path / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(KeyError, match="is no Linear of this model's decoder layers"):
        read_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="need r >= 1"):
        apply_lora(model, r=0)
