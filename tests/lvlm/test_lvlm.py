"""The reference LVLM's pruning path (random weights; no training needed for these)."""

from __future__ import annotations

import pytest
import torch
from helpers import REPO_ROOT, assert_close

from glimpse_ops.lvlm import LVLM, GlimpsePruner, GlimpseTopK, RandomPruner, make_batch, tiny
from glimpse_ops.lvlm.model import positions_from_mask

# (atol, rtol) by dtype: caches equal up to rounding; logits after a whole decoder
TOLERANCES = {torch.float32: (1e-5, 1e-5)}
LOGIT_TOLERANCES = {torch.float32: (1e-4, 1e-4)}


@pytest.fixture
def setup(seed):
    model = LVLM(tiny()).eval()
    data = make_batch(model.config, 3, torch.Generator().manual_seed(seed))
    return model, data


@torch.no_grad()
def test_keep_everything_reproduces_the_unpruned_model(setup):
    model, data = setup
    pruner = GlimpsePruner(model, threshold=None, max_keep_ratio=None).eval()
    want, want_state = model.prefill(data.images, data.input_ids, data.attention_mask)
    got, state, info = pruner.prefill(model, data.images, data.input_ids, data.attention_mask)
    assert bool((info["kept_visual"] == model.config.visual_tokens).all())
    assert_close("logits", got, want, LOGIT_TOLERANCES[torch.float32])
    assert torch.equal(state.next_position, want_state.next_position)
    ids = model.generate(data.images, data.input_ids, data.attention_mask, 4)
    assert torch.equal(model.generate(data.images, data.input_ids, data.attention_mask, 4, pruner=pruner), ids)


@torch.no_grad()
@pytest.mark.parametrize("make_pruner", [lambda m: GlimpseTopK(6), lambda m: GlimpsePruner(m, 0.5, 0.25).eval()])
def test_pruned_run_equals_recomputing_on_the_kept_tokens(setup, make_pruner):
    model, data = setup
    pruner = make_pruner(model)
    logits, state, info = pruner.prefill(model, data.images, data.input_ids, data.attention_mask)
    prefix = model.run_prefix(data.images, data.input_ids, data.attention_mask)
    K = model.config.prune_layer
    for b in range(3):
        slots = state.key_valid[0][b]  # compacted slots holding a real (non-padding) token
        kept = info["index"][b][slots]
        # layers 0..K: the compacted caches hold exactly the kept tokens' keys and values
        # (the trained pruner ran them with the glimpse appended: equal up to rounding)
        for layer in range(K + 1):
            assert_close(
                f"keys[{layer}]",
                state.caches[layer][0][b][:, slots],
                prefix.caches[layer][0][b][:, kept],
                TOLERANCES[torch.float32],
            )
            assert_close(
                f"values[{layer}]",
                state.caches[layer][1][b][:, slots],
                prefix.caches[layer][1][b][:, kept],
                TOLERANCES[torch.float32],
            )
        # layers K+1..: from scratch on only the kept tokens, one sample, no padding
        h = prefix.hidden[b : b + 1, kept]
        positions = prefix.positions[b : b + 1, kept]
        valid = torch.ones_like(positions, dtype=torch.bool)
        h, _, _ = model.decoder.run_layers(
            h, positions, valid, [None] * (model.config.layers - K - 1), K + 1, model.config.layers
        )
        assert_close(f"logits[{b}]", logits[b], model.decoder.logits(h[:, -1])[0], LOGIT_TOLERANCES[torch.float32])
    last = positions_from_mask(data.attention_mask)[:, -1]
    assert torch.equal(state.next_position, last + 1), "decoding continues at the original last position + 1"


class FixedScorePruner:
    """Scores from a per-sample seed and a per-sample cap: deterministic, unequal keeps."""

    def __init__(self, seeds: list[int], caps: list[int]) -> None:
        self.seeds, self.caps = seeds, caps

    def prefill(self, model, images, input_ids, attention_mask):
        prefix = model.run_prefix(images, input_ids, attention_mask)
        scores = torch.zeros(input_ids.shape)
        for b, seed in enumerate(self.seeds):  # each sample's visual tokens get its own scores
            visual = prefix.visual[b]
            scores[b, visual] = torch.rand(int(visual.sum()), generator=torch.Generator().manual_seed(seed))
        caps = torch.tensor(self.caps)
        return prefix.prune(scores, None, caps, 1, None).finish(model)


@torch.no_grad()
def test_batch_with_unequal_keeps_equals_single_runs(setup):
    model, data = setup
    pruner = FixedScorePruner([11, 12, 13], [2, 5, 9])
    batched, state, info = pruner.prefill(model, data.images, data.input_ids, data.attention_mask)
    assert info["kept_visual"].tolist() == [2, 5, 9]
    tokens = model.generate(data.images, data.input_ids, data.attention_mask, 3, pruner=pruner)
    for b in range(3):
        row = data.attention_mask[b]
        ids, mask, image = data.input_ids[b : b + 1, row], data.attention_mask[b : b + 1, row], data.images[b : b + 1]
        single_pruner = FixedScorePruner([11 + b], [[2, 5, 9][b]])
        single, _, single_info = single_pruner.prefill(model, image, ids, mask)
        assert single_info["kept_visual"].item() == info["kept_visual"][b].item()
        assert_close(f"logits[{b}]", batched[b], single[0], LOGIT_TOLERANCES[torch.float32])
        assert torch.equal(model.generate(image, ids, mask, 3, pruner=single_pruner)[0], tokens[b])


@torch.no_grad()
def test_random_pruner_keeps_its_budget(setup):
    model, data = setup
    _, state, info = RandomPruner(5, torch.Generator().manual_seed(0)).prefill(
        model, data.images, data.input_ids, data.attention_mask
    )
    assert info["kept_visual"].tolist() == [5, 5, 5]
    full = model.prefill(data.images, data.input_ids, data.attention_mask)[1]
    assert state.cache_bytes() < full.cache_bytes()


def test_glimpse_training_reaches_the_glimpse_through_glimpse_scores(setup):
    model, data = setup
    model.requires_grad_(False)
    pruner = GlimpsePruner(model)
    logits, _, _ = pruner.visual_logits(model, data.images, data.input_ids, data.attention_mask)
    logits.sum().backward()
    assert pruner.glimpse.rows.grad is not None and pruner.glimpse.rows.grad.abs().sum() > 0


def test_fidelity_benchmark_runs_end_to_end(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import fidelity

    out = tmp_path / "fidelity.json"
    assert fidelity.main(["--steps", "20", "10", "64", "--atp-steps", "5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0.0 <= result["baseline_accuracy"] <= 1.0
    assert [m["name"] for m in result["methods"]] == ["glimpseprune", "glimpse_topk", "random", "atp", "atp"]
    assert all(len(m["kept_per_layer"]) == 4 for m in result["methods"][3:])
    assert all(0.0 < m["kept_fraction"] <= 1.0 for m in result["methods"])
