"""The demo picture (python -m glimpse_ops.demo) and the trained-weights checkpoint."""

import torch
from PIL import Image

from glimpse_ops import demo
from glimpse_ops.lvlm import LVLM, GlimpsePruner, make_batch, tiny
from glimpse_ops.lvlm.checkpoint import load_trained, save_trained


def _untrained(max_keep_ratio=0.25):
    torch.manual_seed(0)
    model = LVLM(tiny()).eval()
    return model, GlimpsePruner(model, threshold=None, max_keep_ratio=max_keep_ratio).eval()


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model, pruner = _untrained()
    path = tmp_path / "trained.pt"
    save_trained(path, model, pruner)
    model2, pruner2 = load_trained(path)
    data = make_batch(model.config, 3, torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = pruner.prefill(model, data.images, data.input_ids, data.attention_mask)
        got = pruner2.prefill(model2, data.images, data.input_ids, data.attention_mask)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert torch.equal(got[2]["index"], want[2]["index"])
    assert (pruner2.threshold, pruner2.max_keep_ratio, pruner2.min_keep) == (None, 0.25, 1)


def test_run_examples_reports_what_the_pruner_kept():
    model, pruner = _untrained()
    examples = demo.run_examples(model, pruner, samples=3, seed=7)
    data = make_batch(model.config, 3, torch.Generator().manual_seed(7))
    with torch.no_grad():
        _, _, info = pruner.prefill(model, data.images, data.input_ids, data.attention_mask)
    for b, ex in enumerate(examples):
        assert int(ex.kept.sum()) == int(info["kept_visual"][b]) == 4  # ceil(0.25 * 16), no threshold
        kept_positions = info["index"][b][info["index"][b] >= 0]
        first_visual = int((data.input_ids[b] == 1).nonzero()[0])
        cells = [int(p) - first_visual for p in kept_positions if data.input_ids[b, p] == 1]
        assert ex.kept.nonzero().flatten().tolist() == cells
        assert ex.truth in ("full", "ring", "dot", "bar")


def test_demo_writes_a_png_from_saved_weights(tmp_path, capsys):
    model, pruner = _untrained()
    weights = tmp_path / "trained.pt"
    save_trained(weights, model, pruner)
    out = tmp_path / "kept.png"
    assert demo.main(["--out", str(out), "--weights", str(weights), "--samples", "3"]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width == 3 * (model.config.grid * demo.CELL_PX + 16) + 16
        # The kept cells are outlined in the highlight color somewhere in the picture.
        assert (255, 200, 0) in {pixel for _, pixel in image.convert("RGB").getcolors(1 << 20)}
    assert "wrote" in capsys.readouterr().out


def test_demo_trains_when_no_weights_are_given(tmp_path):
    out = tmp_path / "kept.png"
    assert demo.main(["--out", str(out), "--steps", "3", "2", "--samples", "1"]) == 0
    assert out.stat().st_size > 0
