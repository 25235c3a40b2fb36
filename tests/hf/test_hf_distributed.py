"""Both trainers under torch.distributed on CPU (gloo, 2 processes, tiny random Qwen2.5-VL):
each run is a subprocess of ``dist_train.py`` (torchrun for 2 ranks) or of the CLI.

* 2 ranks x b samples step exactly as 1 process x 2b (gradients of the first step, parameters
  after three), DDP and FSDP2, glimpse and ATP; the two ranks hold different numbers of
  visual tokens, so a per-rank mean of kept fractions would change the budget's gradient.
* gradient accumulation on 2 ranks = on 1 process.
* activation checkpointing gives the same gradients (the recomputed layers see the same keep
  weights) and really recomputes.
* a checkpoint saved on 2 ranks resumes on 1 and the reverse, and continues identically.
* ``python -m glimpse_ops.hf.train`` runs two steps under torchrun on a JSON-lines set of
  Pillow images and writes its checkpoint, history and trained stages.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dist_train.global_batch

pytest.importorskip("transformers")  # CI installs it: the README test command

from glimpse_ops.hf._compat import is_checkpointing  # noqa: E402

WORKER = Path(__file__).with_name("dist_train.py")
TOLERANCE = dict(rtol=1e-4, atol=1e-5)
# parameters after a few Adam steps (lr 1e-2): Adam divides tiny gradients by their own
# magnitude, so fp32 summation-order noise in them moves a weight by up to ~1e-4 of a step's 1e-2
PARAM_TOLERANCE = dict(rtol=1e-4, atol=1e-4)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


def _run(tmp: Path, name: str, ranks: int, *args: str) -> dict:
    out = tmp / f"{name}.pt"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = (launcher if ranks > 1 else [sys.executable]) + [str(WORKER), "--out", str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    result = torch.load(out, weights_only=False)
    assert result["world"] == ranks
    return result


def _assert_same(got: dict, want: dict, key: str) -> None:
    assert set(got[key]) == set(want[key])
    tolerance = PARAM_TOLERANCE if key == "params" else TOLERANCE
    for name in want[key]:
        torch.testing.assert_close(got[key][name], want[key][name], **tolerance, msg=f"{key} {name} differ")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process references (with a checkpoint after step 2) and the 2-rank DDP run."""
    tmp = tmp_path_factory.mktemp("dist")
    done = {"tmp": tmp}
    for mode in ("glimpse", "atp"):
        done[mode, 1] = _run(tmp, f"{mode}-1", 1, "--mode", mode, "--save-every", "2",
                             "--checkpoint-dir", str(tmp / f"{mode}-1"))  # fmt: skip
    done["glimpse", 2] = _run(tmp, "glimpse-2", 2, "--save-every", "2", "--checkpoint-dir", str(tmp / "glimpse-2"))
    return done


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["glimpse", "atp"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_step_as_one_process_with_the_whole_batch(runs, mode, strategy):
    ref = runs[mode, 1]
    if (mode, strategy) == ("glimpse", "ddp"):
        got = runs["glimpse", 2]
    else:
        got = _run(runs["tmp"], f"{mode}-{strategy}", 2, "--mode", mode, "--strategy", strategy)
    assert any(float(g.abs().max()) > 0 for g in ref["grads"].values())
    _assert_same(got, ref, "grads")
    _assert_same(got, ref, "params")
    for a, b in zip(got["history"], ref["history"]):  # the logged loss and kept fraction are the global ones
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["kept_fraction"] == pytest.approx(b["kept_fraction"], rel=1e-5)


@pytest.mark.slow
def test_grpo_on_two_ranks_steps_as_one_process_with_the_whole_batch(tmp_path):
    """GlimpsePrune+'s stage 1 under DDP: each prompt's rollouts are seeded by its own ids, and
    the loss, the reward and the KL are the global batch's."""
    pytest.importorskip("peft")
    one = _run(tmp_path, "grpo-1", 1, "--mode", "grpo", "--steps", "2")
    two = _run(tmp_path, "grpo-2", 2, "--mode", "grpo", "--steps", "2")
    assert any(float(g.abs().max()) > 0 for g in one["grads"].values())
    _assert_same(two, one, "grads")
    _assert_same(two, one, "params")
    for a, b in zip(two["history"], one["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["reward"] == pytest.approx(b["reward"], rel=1e-6)


@pytest.mark.slow
def test_gradient_accumulation_on_two_ranks_equals_one_process(tmp_path):
    one = _run(tmp_path, "accum-1", 1, "--accum", "2", "--steps", "2")
    two = _run(tmp_path, "accum-2", 2, "--accum", "2", "--steps", "2", "--strategy", "fsdp")
    _assert_same(two, one, "grads")
    _assert_same(two, one, "params")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["glimpse", "atp"])
def test_activation_checkpointing_recomputes_the_same_keep_weights(runs, mode):
    got = _run(runs["tmp"], f"{mode}-checkpointing", 1, "--mode", mode, "--checkpointing")
    assert got["layer_calls"] > runs[mode, 1]["layer_calls"], "the layers were not recomputed"
    _assert_same(got, runs[mode, 1], "grads")
    _assert_same(got, runs[mode, 1], "params")


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_trainable_weights(runs):
    got = _run(runs["tmp"], "glimpse-bf16", 2, "--bf16", "--strategy", "fsdp")
    assert {str(p.dtype) for p in got["params"].values()} == {"torch.float32"}
    assert got["optimizer_dtypes"] == {"torch.float32"}
    assert all(math.isfinite(r["loss"]) for r in got["history"])
    ref = runs["glimpse", 1]
    # bf16 rounding moves the numbers, not the training: same direction, close losses
    assert got["history"][-1]["loss"] == pytest.approx(ref["history"][-1]["loss"], rel=0.05)
    moved = sum(float((got["params"][k] - ref["params"][k]).abs().max()) for k in ref["params"])
    assert moved > 0, "bf16 compute cannot reproduce fp32 bit for bit"


@pytest.mark.slow
@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_world_size(runs, saved_on, resumed_on):
    checkpoint = runs["tmp"] / f"glimpse-{saved_on}" / "step-000002.pt"
    strategy = "fsdp" if resumed_on == 2 else "ddp"
    got = _run(runs["tmp"], f"resume-{saved_on}-{resumed_on}", resumed_on, "--resume", str(checkpoint),
               "--strategy", strategy)  # fmt: skip
    assert [r["step"] for r in got["history"]] == [3]
    _assert_same(got, runs["glimpse", 1], "params")
    assert got["history"][0]["loss"] == pytest.approx(runs["glimpse", 1]["history"][-1]["loss"], rel=1e-5)


def _cli(tmp_path: Path, out: str, ranks: int, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m"]
    command = (launcher if ranks > 1 else [sys.executable, "-m"]) + [
        "glimpse_ops.hf.train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"),
        "--mode", "atp", "--atp-layers", "1,3", "--out", str(tmp_path / out), *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)


@pytest.mark.slow
def test_the_cli_trains_under_torchrun_and_resumes_on_another_world_size(tmp_path):
    from PIL import Image

    from glimpse_ops.hf import testing

    testing.save_tiny_llava(tmp_path / "model")
    with (tmp_path / "data.jsonl").open("w") as f:
        for i in range(5):
            Image.new("RGB", (16 + 4 * i, 16), (50 * i, 200 - 30 * i, 90)).save(tmp_path / f"image{i}.png")
            f.write(json.dumps({"image": f"image{i}.png", "question": f"what is in {i}?", "answer": "a square"}) + "\n")
    # 2 processes x 1 sample, 2 steps; then 1 process x 2 samples resumes for a third step
    done = _cli(tmp_path, "two", 2, "--steps", "2", "--batch-size", "1")
    assert done.returncode == 0, done.stderr[-6000:]
    assert "[2/2] loss" in done.stdout and done.stdout.count("[2/2]") == 1, "progress is printed on rank 0 only"
    history = [json.loads(line) for line in (tmp_path / "two" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, 2] and all(r["loss"] > 0 for r in history)
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000002.pt"
    assert checkpoint.is_file()
    stages = torch.load(tmp_path / "two" / "atp_stages.pt", weights_only=True)
    assert stages["layers"] == [1, 3] and stages["state"]

    resumed = _cli(tmp_path, "resumed", 1, "--steps", "3", "--batch-size", "2", "--resume", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    straight = _cli(tmp_path, "straight", 1, "--steps", "3", "--batch-size", "2")
    assert straight.returncode == 0, straight.stderr[-6000:]
    got = torch.load(tmp_path / "resumed" / "atp_stages.pt", weights_only=True)["state"]
    want = torch.load(tmp_path / "straight" / "atp_stages.pt", weights_only=True)["state"]
    for name in want:  # the same samples in the same steps: the third step continues identically
        torch.testing.assert_close(got[name], want[name], **TOLERANCE)

    # another number of samples per step would not continue the data: refused
    refused = _cli(tmp_path, "refused", 1, "--steps", "3", "--batch-size", "1", "--resume", str(checkpoint))
    assert refused.returncode != 0 and "2 samples per step" in refused.stderr


def test_one_process_steps_with_the_gradient_of_the_plain_loss(seed):
    """The trainer's scaled per-rank share is, on one process, the gradient of the plain loss
    (catches a scale error that 2 ranks vs 1 process cannot see)."""
    from dist_train import global_batch

    from glimpse_ops.glimpseprune import GlimpsePredictor
    from glimpse_ops.hf import testing
    from glimpse_ops.hf.atp import apply_atp
    from glimpse_ops.hf.losses import glimpse_training_loss
    from glimpse_ops.hf.trainer import TrainConfig, Trainer, atp_loss_terms

    batch = global_batch(0, 1, 0)
    for mode in ("glimpse", "atp"):
        model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
        torch.manual_seed(seed)
        predictor = GlimpsePredictor.for_model(model, 3, (1, 0), width=32, cond=32, fuse_heads=2)
        model.requires_grad_(False)
        if mode == "glimpse":
            glimpse_training_loss(model, predictor, batch, 0.2, 2.0)[0].backward()
            want = {n: p.grad.clone() for n, p in predictor.named_parameters()}
        else:
            handle = apply_atp(model, (1, 3), mode="train")
            atp_loss_terms(model, handle, batch).loss(0.2, 2.0)[0].backward()
            want = {n: p.grad.clone() for n, p in handle.stages.named_parameters()}
            stages = handle.stages
            handle.remove()
        config = TrainConfig(mode=mode, keep_ratio=0.2, budget_weight=2.0)
        trainer = Trainer(model, config, predictor=predictor if mode == "glimpse" else None,
                          atp_stages=stages if mode == "atp" else None, log=None)  # fmt: skip
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._micro_step(batch, True)
        for name, p in trainer.trainable.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-7, msg=f"{mode} {name}")
        trainer.close()


def test_close_gives_the_model_back(seed):
    from glimpse_ops.hf import testing
    from glimpse_ops.hf.trainer import TrainConfig, Trainer

    model = testing.tiny_qwen2_5_vl()
    trainer = Trainer(model, TrainConfig(mode="atp", activation_checkpointing=True), atp_layers=(1, 3), log=None)
    assert is_checkpointing(model) and model.training
    trainer.close()
    assert not is_checkpointing(model) and not model.training
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="layers must be increasing"):
        Trainer(model, TrainConfig(mode="atp"), atp_layers=(3, 1), log=None)
    assert all(p.requires_grad for p in model.parameters()), "a failed start leaves the model as it was"


def test_bad_records_are_refused_with_the_line(tmp_path):
    from glimpse_ops.hf.data import read_jsonl

    (tmp_path / "a.jsonl").write_text('{"image": "missing.png", "question": "q", "answer": "a"}\n')
    with pytest.raises(FileNotFoundError, match="a.jsonl:1: no image"):
        read_jsonl(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"image": "x.png", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:1 needs string fields \['answer'\]"):
        read_jsonl(tmp_path / "b.jsonl")


def test_bad_configurations_are_refused():
    from glimpse_ops.hf import testing
    from glimpse_ops.hf.trainer import TrainConfig, Trainer

    with pytest.raises(ValueError, match="strategy must be one of"):
        TrainConfig(strategy="zero3").check()
    with pytest.raises(ValueError, match="needs predictor="):
        Trainer(testing.tiny_qwen2_5_vl(), TrainConfig(mode="glimpse"), log=None)
    with pytest.raises(TypeError, match="trained GlimpsePrune needs"):
        from glimpse_ops.glimpseprune import GlimpsePredictor

        llava = testing.tiny_llava()
        Trainer(llava, TrainConfig(), predictor=GlimpsePredictor.for_model(testing.tiny_qwen2_5_vl(), 3, (1, 0)))
