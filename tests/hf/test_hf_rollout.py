"""glimpse_ops.hf.rollout on tiny HF models: keep sets from boxes and from a VIP, pruned
sampling, and the masked forward whose log-probabilities must equal the sampler's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops import hf  # noqa: E402
from glimpse_ops.glimpseprune import GlimpsePredictor  # noqa: E402
from glimpse_ops.hf import rollout, testing  # noqa: E402
from glimpse_ops.hf.grpo import completion_mask  # noqa: E402

FAMILIES = {
    "qwen2_5_vl": (testing.tiny_qwen2_5_vl, testing.qwen_inputs, [(4, 4), (4, 4)]),
    "llava": (testing.tiny_llava, testing.llava_inputs, [(8, 8), (8, 8)]),
}
K = 2
BOXES = [[[0.0, 0.0, 0.4, 0.6]], [[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.2, 0.2]]]


@pytest.fixture(params=[(f, impl) for f in FAMILIES for impl in ("sdpa", "eager")], ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request, seed):
    name, impl = request.param
    build, inputs, grids = FAMILIES[name]
    model = build(impl, seed=seed % 1000)
    prompt = inputs(batch=2, text_lengths=[2, 5], seed=seed)
    return model, prompt, grids, seed


def test_box_token_mask_is_the_official_rasterization():
    got = rollout.box_token_mask([[0.1, 0.2, 0.5, 0.9]], (4, 6))
    want = torch.zeros(4, 6, dtype=torch.bool)
    want[0:4, 0:4] = True  # rows int(0.8)=0 .. min(int(3.6), 3)=3; cols int(0.6)=0 .. min(int(3.0), 5)=3
    assert torch.equal(got, want)
    edge = rollout.box_token_mask([[0.9, 0.9, 1.0, 1.0]], (4, 6))
    assert edge.nonzero().tolist() == [[3, 5]], "a box at the far edge keeps the last token, not one past it"
    with pytest.raises(ValueError, match="normalized xyxy"):
        rollout.box_token_mask([[0.5, 0.5, 0.2, 0.9]], (4, 4))
    with pytest.raises(ValueError, match="normalized xyxy"):
        rollout.box_token_mask([[0, 0, 20, 30]], (4, 4))


def test_box_keep_places_each_image_grid_on_its_tokens(setup):
    model, prompt, grids, _ = setup
    keep = rollout.box_keep(model, prompt, BOXES)
    visual = prompt["input_ids"] == testing.IMAGE
    assert rollout.image_grids(model, prompt) == grids
    assert not bool((keep & ~visual).any()), "only visual positions are in a keep set"
    for b, (boxes, grid) in enumerate(zip(BOXES, grids)):
        want = rollout.box_token_mask(boxes, grid).flatten()
        assert torch.equal(keep[b][visual[b]], want)
    with pytest.raises(ValueError, match="2 images in the batch but boxes for 1"):
        rollout.box_keep(model, prompt, BOXES[:1])


def test_rollouts_are_pruned_and_their_log_probs_equal_the_sampler(setup):
    model, prompt, _, seed = setup
    keep = rollout.box_keep(model, prompt, BOXES)
    G, T = 3, 5
    rolled = rollout.sample(model, prompt, keep, G, T, layer=K, generator_seed=seed)
    assert rolled.completion_ids.shape == (2 * G, T)
    assert rolled.kept_visual.tolist() == [int(keep[b].sum()) for b in range(2) for _ in range(G)]
    again = rollout.sample(model, prompt, keep, G, T, layer=K, generator_seed=seed)
    assert torch.equal(again.completion_ids, rolled.completion_ids), "a seed reproduces the rollouts"
    # rollout 0 of each prompt is what generate() of the pruned model samples with that seed
    selection = rollout.ForcedSelection()
    selection.keep = keep
    with hf.pruned(model, layer=K, threshold=None, max_keep_ratio=1.0, selection=selection), torch.no_grad():
        torch.manual_seed(seed)
        direct = model.generate(**prompt, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=T,
                                suppress_tokens=list(hf.adapters.adapter_for(model).visual_token_ids))  # fmt: skip
    assert torch.equal(rolled.completion_ids[::G, : direct.shape[1] - prompt["input_ids"].shape[1]],
                       direct[:, prompt["input_ids"].shape[1] :])  # fmt: skip
    counted = completion_mask(rolled.completion_ids, testing.EOS)
    for g in range(G):
        rows = slice(g, None, G)
        logps = rollout.completion_logps(model, prompt, rolled.completion_ids[rows], keep, K)
        torch.testing.assert_close(
            logps[counted[rows]], rolled.sampler_logps[rows][counted[rows]], rtol=1e-4, atol=1e-4
        )
        unpruned = rollout.completion_logps(model, prompt, rolled.completion_ids[rows], keep, K, mode="unpruned")
        assert (unpruned - logps).abs()[counted[rows]].max() > 1e-3, "the keep set changes the computation"


def test_the_official_reference_mixes_an_unpruned_first_token_with_input_level_pruning(setup):
    model, prompt, _, seed = setup
    keep = rollout.box_keep(model, prompt, BOXES)
    ids = torch.randint(3, 200, (2, 4), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = rollout.official_reference_logps(model, prompt, ids, keep, K)
        unpruned = rollout.completion_logps(model, prompt, ids, keep, K, mode="unpruned")
        inputs_pruned = rollout.completion_logps(model, prompt, ids, keep, K, mode="input_pruned")
        pruned = rollout.completion_logps(model, prompt, ids, keep, K)
    torch.testing.assert_close(ref[:, 0], unpruned[:, 0])
    torch.testing.assert_close(ref[:, 1:], inputs_pruned[:, 1:])
    assert (inputs_pruned - pruned).abs().max() > 1e-4, "input-level pruning is not the layer-K prune"


def test_log_probs_carry_gradients_to_the_language_model(setup):
    model, prompt, _, seed = setup
    keep = rollout.box_keep(model, prompt, BOXES)
    ids = torch.randint(3, 200, (2, 3), generator=torch.Generator().manual_seed(seed))
    layer0 = hf.adapters.adapter_for(model).layers[0].self_attn.q_proj
    model.requires_grad_(False)
    layer0.weight.requires_grad_(True)
    rollout.completion_logps(model, prompt, ids, keep, K).sum().backward()
    assert layer0.weight.grad is not None and bool(layer0.weight.grad.abs().sum() > 0)
    model.requires_grad_(True)


def test_a_predictor_keep_set_is_what_the_vip_keeps(seed):
    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    prompt = testing.qwen_inputs(batch=2, text_lengths=[2, 5], seed=seed)
    predictor = GlimpsePredictor.for_model(model, 3, (1, 0), width=32, cond=32, fuse_heads=2)
    keep = rollout.predictor_keep(model, predictor, prompt, fixed_keep_ratio=0.25)
    with hf.pruned(model, predictor=predictor, fixed_keep_ratio=0.25) as handle, torch.no_grad():
        model(**prompt)
        kept = handle.last_kept_visual.tolist()
    assert keep.sum(dim=1).tolist() == kept == [4, 4]
    assert not bool((keep & ~(prompt["input_ids"] == testing.IMAGE)).any())


def test_flash_attention_is_refused_for_the_masked_forward(monkeypatch, seed):
    import plain_flash

    plain_flash.install(monkeypatch)
    model = testing.tiny_llava(seed=seed % 1000)
    prompt = testing.llava_inputs(batch=2, text_lengths=[2, 5], seed=seed)
    keep = rollout.box_keep(model, prompt, BOXES)
    model.set_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="completion_logps: the glimpse trainer adds a soft mask"):
        rollout.completion_logps(model, prompt, torch.ones(2, 2, dtype=torch.long), keep, K)


def test_per_prompt_sampling_does_not_depend_on_the_batch(setup):
    model, prompt, _, seed = setup
    keep = rollout.box_keep(model, prompt, BOXES)
    both = rollout.sample_per_prompt(model, prompt, keep, 2, 4, K, 1.0, seed)
    parts = rollout.split_prompt(model, prompt)
    mask = prompt["attention_mask"].bool()
    assert [p["input_ids"].shape[1] for p in parts] == mask.sum(dim=1).tolist(), "left padding dropped"
    alone = rollout.sample_per_prompt(model, parts[1], keep[1:, mask[1]], 2, 4, K, 1.0, seed)
    T = alone.completion_ids.shape[1]
    assert torch.equal(both.completion_ids[2:, :T], alone.completion_ids), "prompt 1 samples the same in any batch"
    torch.testing.assert_close(both.sampler_logps[2:, :T], alone.sampler_logps, rtol=1e-5, atol=1e-5)
    assert both.kept_visual.tolist() == [int(keep[0].sum())] * 2 + [int(keep[1].sum())] * 2
