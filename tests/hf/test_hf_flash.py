"""Pruning under transformers' FlashAttention paths (flash_attention_2, flash_attention_3 and a
kernels-hub flash kernel), on CPU: ``plain_flash`` stands in for the FlashAttention kernels, in
plain PyTorch, so that transformers' own unpadding, ``cu_seqlens`` and cache handling run for
real. Each pruned flash run is compared with the same model's pruned sdpa run: the same kept
tokens, the same greedy tokens, the same logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # CI installs it: the README test command

import plain_flash  # noqa: E402
from test_hf_prune import FAMILIES  # noqa: E402

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.glimpseprune.predictor import GlimpsePredictor  # noqa: E402
from glimpse_ops.hf import testing  # noqa: E402
from glimpse_ops.hf.atp import apply_atp  # noqa: E402
from glimpse_ops.hf.losses import glimpse_training_loss  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture
def flash(monkeypatch):
    plain_flash.install(monkeypatch)
    return plain_flash.CALLS


def _run(model, x, n=4, **settings):
    """(last-position logits, greedy tokens, kept index, scores) of a pruned prefill + generate."""
    with hf.pruned(model, **settings) as handle:
        with torch.no_grad():
            logits = model(**x).logits[:, -1]
            index, scores = handle.last_index.clone(), handle.last_scores.clone()
            tokens = model.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return logits, tokens, index, scores


def _assert_same(got, want):
    logits, tokens, index, scores = got
    assert torch.equal(index, want[2]), "the same tokens are kept"
    torch.testing.assert_close(scores, want[3], **TOL)
    torch.testing.assert_close(logits, want[0], **TOL)
    assert torch.equal(tokens, want[1])


def _kept_lengths(index, attention_mask) -> list[int]:
    """The compacted prompt's length per row: kept positions that are not padding."""
    return [int(attention_mask[b][row[row >= 0]].sum()) for b, row in enumerate(index)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_flash_attention_2_prunes_as_sdpa_does(name, flash, seed):
    build, inputs, _ = FAMILIES[name]
    model = build("sdpa", seed=seed % 1000)
    x = inputs(batch=2, text_lengths=[2, 6], seed=seed)  # left padding: the varlen path
    settings = dict(layer=2, max_keep_ratio=0.25)
    want = _run(model, x, **settings)
    model.set_attn_implementation("flash_attention_2")
    assert model.config.text_config._attn_implementation.startswith("kernels-community/flash-attn")
    flash.clear()
    got = _run(model, x, **settings)
    _assert_same(got, want)
    lengths = x["attention_mask"].sum(dim=1).tolist()
    kept = _kept_lengths(got[2], x["attention_mask"])
    varlen = [c for c in flash if c[0] == "varlen"]
    assert any(c[2] == lengths for c in varlen), "layers 0..K run on the padded prompt, unpadded"
    assert any(c[2] == kept and c[1] == kept for c in varlen), "layers K+1.. run on the compacted prompt"
    decode = [c for c in varlen if c[1] == [1, 1]]
    assert decode and all(c[2][0] - c[2][1] == kept[0] - kept[1] for c in decode), (
        "decode steps attend to the compacted caches (the padding of the compacted rows removed)"
    )


@pytest.mark.parametrize("implementation", ["flash_attention_3", "kernels-community/flash-attn3"])
def test_other_flash_implementations_prune_as_sdpa_does(implementation, flash, seed):
    model = testing.tiny_qwen2_5_vl("sdpa", seed=seed % 1000)
    x = testing.qwen_inputs(batch=2, text_lengths=[3, 5], seed=seed)
    want = _run(model, x, max_keep_ratio=0.3)
    model.set_attn_implementation(implementation)
    flash.clear()
    got = _run(model, x, max_keep_ratio=0.3)
    _assert_same(got, want)
    kept = _kept_lengths(got[2], x["attention_mask"])
    assert any(c[0] == "varlen" and c[2] == kept for c in flash), "the text layers after the prune ran this kernel"


def test_an_unpadded_batch_runs_the_dense_kernel_after_the_prune(flash, seed):
    # keep everything: every row keeps the same count, the compacted prompt has no padding
    model = testing.tiny_llava("sdpa", seed=seed % 1000)
    x = testing.llava_inputs(batch=2, text_lengths=[4, 4], seed=seed)
    want = _run(model, x, threshold=None, max_keep_ratio=0.5)
    model.set_attn_implementation("flash_attention_2")
    flash.clear()
    got = _run(model, x, threshold=None, max_keep_ratio=0.5)
    _assert_same(got, want)
    kept = _kept_lengths(got[2], x["attention_mask"])
    assert kept[0] == kept[1] and ("dense", kept, kept) in flash


def _threshold_with_unequal_keeps(model, x) -> float:
    """A threshold on the glimpse probabilities, in a wide gap between scores (rounding cannot
    flip a token), at which the two samples keep different numbers of visual tokens."""
    with hf.pruned(model, threshold=None, max_keep_ratio=1.0) as handle:
        with torch.no_grad():
            model(**x)
        scores, visual = handle.last_scores, handle.last_visual
    ranked = scores[visual].sort().values
    gaps = [(float(b - a), float(a + b) / 2) for a, b in zip(ranked[:-1], ranked[1:])]
    return next(
        t
        for _, t in sorted(gaps, reverse=True)
        if max(1, int((scores[0][visual[0]] > t).sum())) != max(1, int((scores[1][visual[1]] > t).sum()))
    )  # (min_keep=1)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava"])
def test_an_unpadded_batch_with_unequal_keeps_decodes_with_the_compacted_mask(name, flash, seed):
    # generate() drops an all-ones prompt mask; after the prune the row that kept fewer tokens pads
    build, inputs, _ = FAMILIES[name]
    model = build("sdpa", seed=seed % 1000)
    x = inputs(batch=2, text_lengths=[4, 4], seed=seed)
    threshold = _threshold_with_unequal_keeps(model, x)
    settings = dict(threshold=threshold, max_keep_ratio=1.0, min_keep=1)
    want = _run(model, x, **settings)
    model.set_attn_implementation("flash_attention_2")
    flash.clear()
    got = _run(model, x, **settings)
    _assert_same(got, want)
    kept = _kept_lengths(got[2], x["attention_mask"])
    assert kept[0] != kept[1]
    decode = [c for c in flash if c[0] == "varlen" and c[1] == [1, 1]]
    assert decode and all(c[2][0] - c[2][1] == kept[0] - kept[1] for c in decode), "decode unpads the compacted rows"


@pytest.mark.parametrize("lengths", [[2, 5], [4]], ids=["padded", "B=1"])
@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl", "internvl"])
def test_a_trained_predictor_prunes_under_flash_as_under_sdpa(name, lengths, flash, seed):
    build, inputs, _ = FAMILIES[name]
    model = build("sdpa", seed=seed % 1000)
    x = inputs(batch=len(lengths), text_lengths=lengths, seed=seed)  # the glimpse row rides at the end
    predictor = GlimpsePredictor.for_model(model, 3, (1, 0), width=32, cond=32, fuse_heads=2)
    want = _run(model, x, predictor=predictor, fixed_keep_ratio=0.3)
    model.set_attn_implementation("flash_attention_2")
    flash.clear()
    got = _run(model, x, predictor=predictor, fixed_keep_ratio=0.3)
    _assert_same(got, want)
    with_glimpse = (x["attention_mask"].sum(dim=1) + 1).tolist()
    kept = _kept_lengths(got[2], x["attention_mask"])
    key_lengths = [c[2] for c in flash]
    assert with_glimpse in key_lengths, "layers 0..K ran the kernel on the prompt and the glimpse row"
    assert kept in key_lengths, "layers K+1.. ran it on the kept tokens"


ATP_FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "internvl", "llava"]
ATP_LAYERS = (2, 4)


def _atp_run(model, x, mode, stages=None):
    """(logits [B, V] at the last position, kept [B], greedy tokens or None, stages) under ATP."""
    handle = apply_atp(model, ATP_LAYERS, mode=mode, stages=stages)
    if stages is None:
        with torch.no_grad():
            for stage in handle.stages.values():  # thresholds that prune some tokens
                stage.mlp[2].bias.copy_(torch.tensor([0.0, 1.5]))
    try:
        if mode == "train":
            logits = model(**x).logits[:, -1]
            return logits, handle.kept.detach(), None, handle.stages
        with torch.no_grad():
            logits = model(**x).logits[:, -1]
            kept = handle.kept.clone()
            tokens = model.generate(**x, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        return logits, kept, tokens, handle.stages
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ATP_FAMILIES)
def test_atp_inference_under_flash_matches_sdpa(name, flash, seed):
    build, inputs, _ = FAMILIES[name]
    model = build("sdpa", seed=seed % 1000)
    x = inputs(batch=2, text_lengths=[2, 6], seed=seed)
    want = _atp_run(model, x, "infer")
    model.set_attn_implementation("flash_attention_2")
    loaded = model.config.text_config._attn_implementation
    flash.clear()
    got = _atp_run(model, x, "infer", stages=want[3])
    assert torch.equal(got[1], want[1]), "the same tokens are kept"
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert torch.equal(got[2], want[2])
    lengths = x["attention_mask"].sum(dim=1).tolist()
    text_calls = [c for c in flash if c[0] == "varlen" and len(c[2]) == 2]
    # the forward and generate's prefill: layers 0..first-1 through the flash kernel, unpadded
    assert sum(c[2] == lengths for c in text_calls) == 2 * ATP_LAYERS[0], "layers before the first stage run flash"
    decode = [c for c in text_calls if c[1] == [1, 1]]
    assert len(decode) == 2 * ATP_LAYERS[0], "and so does each decode step there (2 steps)"
    assert model.config.text_config._attn_implementation == loaded, "remove() restores the loaded kernel"


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava"])
def test_atp_training_under_flash_matches_sdpa(name, flash, seed):
    build, inputs, _ = FAMILIES[name]
    model = build("sdpa", seed=seed % 1000)
    model.requires_grad_(False)
    x = inputs(batch=2, text_lengths=[2, 6], seed=seed)
    target = torch.tensor([5, 7])

    def grads(stages=None):
        logits, kept, _, stages = _atp_run(model, x, "train", stages)
        torch.nn.functional.cross_entropy(logits, target).backward()
        out = {n: p.grad.clone() for n, p in stages.named_parameters()}
        stages.zero_grad(set_to_none=True)
        return logits.detach(), kept, out, stages

    want = grads()
    model.set_attn_implementation("flash_attention_2")
    flash.clear()
    got = grads(want[3])
    lengths = x["attention_mask"].sum(dim=1).tolist()
    assert sum(c[2] == lengths for c in flash) == ATP_LAYERS[0], "layers before the first stage ran flash"
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_glimpse_trainer_refuses_flash_and_the_atp_trainer_runs_under_it(flash, seed):
    from glimpse_ops.hf.trainer import TrainConfig, Trainer

    model = testing.tiny_qwen2_5_vl("sdpa", seed=seed % 1000)
    model.set_attn_implementation("flash_attention_2")
    predictor = GlimpsePredictor.for_model(model, 3, (1, 0), width=32, cond=32, fuse_heads=2)
    refusal = r"the glimpse trainer adds a soft mask.*FlashAttention cannot take.*attn_implementation='sdpa'"
    with pytest.raises(ValueError, match="Trainer: " + refusal):
        Trainer(model, TrainConfig(mode="glimpse"), predictor=predictor, log=None)
    assert all(p.requires_grad for p in model.parameters()), "a refused start leaves the model as it was"
    batch = testing.qwen_training_batch(seed=seed, inputs=testing.qwen_inputs)
    with pytest.raises(ValueError, match="glimpse_loss_terms: " + refusal):
        glimpse_training_loss(model, predictor, batch, keep_ratio=0.1)
    trainer = Trainer(model, TrainConfig(mode="atp", lr=1e-2), atp_layers=(1, 3), log=None)
    flash.clear()
    trainer.fit([batch, batch], steps=2)
    trainer.close()
    assert any(c[0] == "varlen" for c in flash), "layers before the first stage trained under flash"


def test_unsupported_attention_implementations_are_refused_naming_the_alternative(seed):
    model = testing.tiny_llava("sdpa", seed=seed % 1000)  # Qwen2.5-VL has no flex_attention in transformers
    model.set_attn_implementation({"text_config": "flex_attention"})
    alternative = r"'flex_attention' is not supported.*attn_implementation='sdpa' or 'flash_attention_2'"
    with pytest.raises(ValueError, match="apply_glimpse_prune: attention implementation " + alternative):
        hf.apply_glimpse_prune(model)
    with pytest.raises(ValueError, match="apply_atp: attention implementation " + alternative):
        apply_atp(model, ATP_LAYERS)
    from glimpse_ops.hf.trainer import TrainConfig, Trainer

    with pytest.raises(ValueError, match="Trainer: attention implementation " + alternative):
        Trainer(model, TrainConfig(mode="atp"), atp_layers=(1, 3), log=None)
    assert model.config.text_config._attn_implementation == "flex_attention", "nothing was patched"
