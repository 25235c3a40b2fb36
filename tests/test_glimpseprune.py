"""glimpse_ops.glimpseprune: GlimpsePrune's settings resolved in one place (the layer, the two
keep rules, their defaults and errors), the old names that keep working for a release with a
DeprecationWarning, and the rules each written once in the source."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import REPO_ROOT

from glimpse_ops.glimpseprune import (
    PredictorConfig,
    PruneSettings,
    TrainedKeepRule,
    TrainingFreeRule,
    ceil_caps,
    default_layer,
)


def _config(**keep) -> PredictorConfig:
    return PredictorConfig(score_layer=3, vit_layers=(1,), heads=4, hidden=32, vit_dim=16, **keep)


def test_default_layer_is_about_two_thirds_of_the_depth():
    assert [default_layer(n) for n in (1, 9, 28, 32, 36, 80)] == [0, 5, 18, 21, 23, 53]


def test_training_free_defaults_and_caps():
    s = PruneSettings.resolve(28, where="t")
    assert s == PruneSettings(18, TrainingFreeRule(None, 0.1, 1)) and not s.trained
    assert PruneSettings.resolve(28, where="t", threshold=0.01).rule == TrainingFreeRule(0.01, None, 1)
    caps = s.rule.caps(torch.tensor([0, 1, 10, 11, 1024]))
    assert caps.tolist() == [1, 1, 1, 2, 103]  # ceil, at least min(1, min_keep): the cap rounds up
    assert ceil_caps(torch.tensor([5]), None, 1) is None


def test_trained_defaults_come_from_the_predictor():
    s = PruneSettings.resolve(28, _config(reduce_threshold=0.7, max_remain_ratio=0.5, min_remain_num=2), where="t")
    assert s == PruneSettings(3, TrainedKeepRule(0.7, 0.5, 2, None, "sample")) and s.trained
    fixed = PruneSettings.resolve(28, _config(fixed_remain_ratio=0.25), where="t")
    assert fixed.rule.fixed_keep_ratio == 0.25
    explicit = PruneSettings.resolve(28, _config(fixed_remain_ratio=0.25), where="t", threshold=0.6)
    assert explicit.rule.fixed_keep_ratio is None and explicit.rule.threshold == 0.6
    threshold, caps, min_keep = s.rule.limits(torch.tensor([10, 3]), torch.float32)
    assert (threshold, caps.tolist(), min_keep) == (0.7, [5, 1], 2)  # floor: the cap rounds down, at least 1


def test_max_keep_ratio_with_a_predictor_is_read_as_max_remain_ratio_with_a_warning():
    with pytest.warns(DeprecationWarning, match="max_remain_ratio"):
        old = PruneSettings.resolve(28, _config(), where="t", max_keep_ratio=0.3)
    assert old == PruneSettings.resolve(28, _config(), where="t", max_remain_ratio=0.3)
    with pytest.raises(ValueError, match="name the same cap"):
        PruneSettings.resolve(28, _config(), where="t", max_keep_ratio=0.3, max_remain_ratio=0.3)


@pytest.mark.parametrize(
    "predictor, given, message",
    [
        (None, dict(max_keep_ratio=0.0), r"t: max_keep_ratio must be in \(0, 1\], got 0.0"),
        (None, dict(min_keep=-1), "t: min_keep must be an int >= 0, got -1"),
        (None, dict(layer=27), r"t: layer must be in \[0, 27\), got 27"),
        (None, dict(fixed_keep_ratio=0.2), "t: fixed_keep_ratio applies with a predictor only"),
        (None, dict(max_remain_ratio=0.2), "t: max_remain_ratio applies with a predictor only"),
        (None, dict(caps_per="image"), "t: caps_per applies with a predictor only"),
        (_config(), dict(layer=4), "t: the predictor was trained for layer 3, got layer=4"),
        (_config(), dict(caps_per="batch"), "t: caps_per must be 'sample' or 'image', got 'batch'"),
        (_config(), dict(fixed_keep_ratio=0.2, threshold=0.5), "t: fixed_keep_ratio keeps a fixed share"),
    ],
)
def test_errors_name_the_caller_and_the_argument(predictor, given, message):
    with pytest.raises(ValueError, match=message):
        PruneSettings.resolve(28, predictor, where="t", **given)


def test_errors_carry_the_callers_prefix():
    with pytest.raises(ValueError, match=r"glimpse_ops.vllm: glimpse_max_keep_ratio must be in \(0, 1\], got 1.5"):
        PruneSettings.resolve(28, where="glimpse_ops.vllm", name_prefix="glimpse_", max_keep_ratio=1.5)


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("glimpse_ops.hf.predictor", "glimpse_ops.glimpseprune.predictor", "GlimpsePredictor"),
        ("glimpse_ops.hf.release", "glimpse_ops.glimpseprune.release", "load_release"),
        ("glimpse_ops.hf.keep_rule", "glimpse_ops.glimpseprune.keep_rule", "TrainedKeepRule"),
        ("glimpse_ops.hf.hooks", "glimpse_ops.hf.patch", "PatchHandle"),
    ],
)
def test_moved_modules_keep_working_for_a_release(old, new, name):
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"assert getattr(old, {name!r}) is getattr(importlib.import_module({new!r}), {name!r})\n"
        f"assert any(issubclass(w.category, DeprecationWarning) and {new!r} in str(w.message) for w in seen)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_old_names_of_the_training_module_keep_working_for_a_release():
    pytest.importorskip("transformers")
    from glimpse_ops.hf import losses, trainer
    from glimpse_ops.hf import train as command

    with pytest.warns(DeprecationWarning, match="glimpse_ops.hf.losses.glimpse_training_loss"):
        assert command.glimpse_training_loss is losses.glimpse_training_loss
    with pytest.warns(DeprecationWarning, match="glimpse_ops.hf.trainer.train_glimpse"):
        assert command.train_glimpse is trainer.train_glimpse
    with pytest.raises(AttributeError):
        command.no_such_name  # noqa: B018


def test_the_training_command_loads_once():
    """python -m glimpse_ops.hf.train used to load its module twice (an import cycle through
    the package): runpy warned that it was already in sys.modules."""
    pytest.importorskip("transformers")
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "glimpse_ops.hf.train", "--help"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: python -m glimpse_ops.hf.train" in done.stdout


def test_glimpseprune_imports_neither_transformers_nor_vllm():
    code = "import sys, glimpse_ops.glimpseprune; assert not {'transformers', 'vllm'} & set(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


RULES = {
    # what: (regex, the one file allowed to hold it, whether bench/ is searched too; the
    # benches' eager peers keep their own copies of the method on purpose)
    "the default layer": (r"2 \* n_layers / 3|2 \* len\(.*\) / 3", "glimpse_ops/glimpseprune/settings.py", True),
    "the training-free cap": (r"torch\.ceil\(.*max_keep_ratio", "glimpse_ops/glimpseprune/keep_rule.py", False),
    "the trained cap": (r"torch\.floor\(.*max_remain_ratio", "glimpse_ops/glimpseprune/keep_rule.py", False),
    "the VIP's head-score slice": (r"\[:, :, 0, :.*\]\.transpose\(1, 2\)\[", "glimpse_ops/glimpseprune/predictor.py",
                                   False),
    "the budget term": (r"\(kept - (c\.)?keep_ratio\)\.abs\(\)", "glimpse_ops/hf/losses.py", False),
}  # fmt: skip


@pytest.mark.parametrize("what", list(RULES))
def test_each_rule_is_written_once(what):
    pattern, home, with_bench = RULES[what]
    found = []
    files = sorted((REPO_ROOT / "glimpse_ops").rglob("*.py")) + (
        sorted((REPO_ROOT / "bench").glob("*.py")) * with_bench
    )
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                found.append(f"{path.relative_to(REPO_ROOT)}:{number}")
    assert [f.split(":")[0] for f in found] == [home], found


def test_nothing_warns_on_the_new_paths():
    pytest.importorskip("transformers")
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "import glimpse_ops.hf, glimpse_ops.hf.train, glimpse_ops.hf.trainer, glimpse_ops.glimpseprune\n"
    )
    with warnings.catch_warnings():
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_engine_kwargs_passes_every_setting_the_plugin_reads():
    from glimpse_ops import vllm as plugin

    overrides = plugin.engine_kwargs(max_keep_ratio=0.2)["hf_overrides"]
    assert [k for k in overrides if k != "architectures"] == [f"glimpse_{k}" for k in plugin.SETTING_KEYS]
    assert overrides["glimpse_max_keep_ratio"] == 0.2 and overrides["glimpse_max_remain_ratio"] is None
