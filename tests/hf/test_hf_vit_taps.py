"""The trained predictor's ViT features line up with the tokens the LLM sees: each feature is
the average of the patches the model itself merges into that token (InternVL's pixel
shuffle, Qwen3-VL's merger), in the LLM's token order."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops.hf import testing  # noqa: E402
from glimpse_ops.hf.vit_taps import VitTaps  # noqa: E402

TOLERANCES = {torch.float32: (1e-6, 1e-5)}


def _tap(taps: VitTaps, level: int, model, x: dict):
    seen = {}
    hooks = [
        taps.vision.register_forward_pre_hook(lambda m, a, k: seen.update(layout=taps.layout(a, k)), with_kwargs=True),
        taps.blocks[level].register_forward_hook(lambda m, a, o: seen.update(out=o[0] if isinstance(o, tuple) else o)),
    ]
    try:
        with torch.no_grad():
            model(**x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["out"], seen["layout"]


def test_internvl_features_average_what_pixel_shuffle_merges():
    model = testing.tiny_internvl()
    taps = VitTaps(model)
    out, layout = _tap(taps, 1, model, testing.internvl_inputs(batch=2))
    tiles, channels = out.shape[0], out.shape[-1]
    assert layout.grids == [(4, 4)] * 2
    shuffled = model.model.pixel_shuffle(out[:, 1:].reshape(tiles, 8, 8, channels), 0.5)  # [T, 4, 4, 4C]
    want = shuffled.reshape(tiles * 16, 4, channels).mean(dim=1)
    assert_close("features", taps.features(out, layout), want, TOLERANCES[torch.float32])


def test_qwen3_vl_features_average_what_the_merger_merges():
    model = testing.tiny_qwen3_vl()
    taps = VitTaps(model)
    x = testing.qwen_image_inputs([[(8, 8), (4, 8)]])
    out, layout = _tap(taps, 1, model, x)
    assert layout.grids == [(4, 4), (2, 4)]
    want = out.reshape(-1, 4, out.shape[-1]).mean(dim=1)  # the merger's groups: 4 consecutive patches
    assert_close("features", taps.features(out, layout), want, TOLERANCES[torch.float32])
