"""Trainer(mode="grpo"): GlimpsePrune+'s stage 1 on tiny HF models (LoRA through peft, pruned
rollouts with box keep sets, rewards from the decoded completions)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")  # CI installs it: the README test command
pytest.importorskip("peft")

from glimpse_ops.hf import rollout, testing  # noqa: E402
from glimpse_ops.hf.grpo import completion_mask, group_advantages, grpo_terms  # noqa: E402
from glimpse_ops.hf.grpo_step import GRPOConfig  # noqa: E402
from glimpse_ops.hf.lora import read_adapter  # noqa: E402
from glimpse_ops.hf.trainer import TrainConfig, Trainer  # noqa: E402

BOXES = [[[0.0, 0.0, 0.5, 0.5]], [[0.25, 0.25, 1.0, 1.0]]]
K = 2


def decode(ids) -> str:
    return " ".join(str(i) for i in ids)


def low_token_share(questions, completions, answers) -> list[float]:
    """A reward the policy can learn: the share of completion tokens below 128."""
    return [sum(int(t) < 128 for t in c.split()) / max(1, len(c.split())) for c in completions]


def _batch(seed: int, model_inputs=testing.qwen_inputs) -> dict:
    x = model_inputs(batch=2, text_lengths=[2, 5], seed=seed)
    return {**x, "questions": ["what is it?", "where?"], "answers": ["a cat", "left"], "boxes": BOXES}


def _trainer(model, seed, **grpo):
    config = GRPOConfig(num_generations=4, max_new_tokens=4, layer=K, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                        seed=seed, **grpo)  # fmt: skip
    return Trainer(model, TrainConfig(mode="grpo", lr=3e-2), grpo=config, reward=low_token_share, decode=decode,
                   eos_token_id=testing.EOS, log=None)  # fmt: skip


def test_a_step_has_the_gradient_of_the_grpo_loss_on_its_rollouts(seed):
    """The trainer's gradient equals the GRPO loss recomputed here one rollout at a time from the
    same rollouts: the prompt-major layout, the groups and the masking are right."""
    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    trainer = _trainer(model, seed, beta=0.04, reference="pruned_base")
    with torch.no_grad():  # a trained-looking adapter: B = 0 would make the KL term vanish
        for p in trainer.lora.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.02)
    batch = _batch(seed)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._micro = 0
    trainer._micro_step(batch, True)
    got = [p.grad.clone() for p in trainer.lora.parameters()]
    last = trainer.step_module.last
    ids, keep, G = last["completion_ids"], last["keep"], 4
    prompt = {k: v for k, v in batch.items() if k not in ("questions", "answers", "boxes")}
    for p in trainer.lora.parameters():
        p.grad = None
    logps, refs = [], []
    for n in range(ids.shape[0]):  # rollout n is prompt n // G
        b = n // G
        one = _single(prompt, b)
        logps.append(
            rollout.completion_logps(model, one, ids[n : n + 1], keep[b : b + 1, -one["input_ids"].shape[1] :], K)
        )
        with torch.no_grad(), trainer.lora.disabled():
            refs.append(
                rollout.completion_logps(model, one, ids[n : n + 1], keep[b : b + 1, -one["input_ids"].shape[1] :], K)
            )
    rewards = torch.tensor(low_token_share(None, last["texts"], None))
    assert torch.equal(rewards, last["rewards"])
    adv = group_advantages(rewards, G)
    terms = grpo_terms(
        torch.cat(logps), completion_mask(ids, testing.EOS), adv, rewards, ref_logp=torch.cat(refs), beta=0.04
    )
    terms.loss().backward()
    for mine, want in zip(got, [p.grad for p in trainer.lora.parameters()]):
        torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-7)
    trainer.close()


def _single(prompt: dict, b: int) -> dict:
    """Prompt b alone, without its left padding (one image per prompt)."""
    rows = prompt["attention_mask"][b].bool()
    n_pix = prompt["pixel_values"].shape[0] // prompt["input_ids"].shape[0]
    return {
        "input_ids": prompt["input_ids"][b : b + 1, rows],
        "attention_mask": prompt["attention_mask"][b : b + 1, rows],
        "mm_token_type_ids": prompt["mm_token_type_ids"][b : b + 1, rows],
        "pixel_values": prompt["pixel_values"][b * n_pix : (b + 1) * n_pix],
        "image_grid_thw": prompt["image_grid_thw"][b : b + 1],
    }


def _policy_logps(model, prompt, ids, keep, G) -> torch.Tensor:
    """Prompt-major [B * G, T] log-probs of the rollouts under the current policy."""
    rows = [rollout.completion_logps(model, prompt, ids[g::G], keep, K) for g in range(G)]
    return torch.stack(rows, dim=1).flatten(0, 1)


def test_a_step_descends_the_grpo_objective_on_its_rollouts(seed):
    """After one optimizer step, the surrogate exp(logp - logp_before) * A over the step's own
    rollouts is higher: the step moved the policy toward its better rollouts."""
    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    trainer = _trainer(model, seed, beta=0.0)
    batch = _batch(seed)
    prompt = {k: v for k, v in batch.items() if k not in ("questions", "answers", "boxes")}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer._micro = 0
    trainer._micro_step(batch, True)
    last = trainer.step_module.last
    ids, keep, adv = last["completion_ids"], last["keep"], last["advantages"]
    mask = completion_mask(ids, testing.EOS)
    with torch.no_grad():
        before = _policy_logps(model, prompt, ids, keep, 4)
        trainer.optimizer.step()
        after = _policy_logps(model, prompt, ids, keep, 4)
        loss_after = grpo_terms(after, mask, adv, last["rewards"], old_logp=before, beta=0.0).loss()
    assert float(adv.abs().sum()) > 0, "the rollouts' rewards differ (else nothing to learn)"
    assert float(loss_after) < float(-adv.mean()) - 1e-4, "the surrogate loss went down"
    weighted = ((after - before) * mask).sum(dim=1) * adv
    assert float(weighted.sum()) > 0, "log-probs rose for positive advantages and fell for negative ones"
    trainer.close()


def test_fit_logs_the_reward_and_exports_the_trained_adapter(seed, tmp_path):
    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    batch = _batch(seed)
    prompt = {k: v for k, v in batch.items() if k not in ("questions", "answers", "boxes")}
    lines = []
    trainer = _trainer(model, seed)
    trainer.log = lines.append
    with torch.no_grad():
        stock = model(**prompt).logits[:, -1]
    history = trainer.fit([batch] * 3)
    assert [r["step"] for r in history] == [1, 2, 3] and all(0 <= r["reward"] <= 1 and r["kl"] >= 0 for r in history)
    assert len(lines) == 3 and "reward" in lines[-1] and "KL" in lines[-1]
    with torch.no_grad():
        trained = model(**prompt).logits[:, -1]
    assert (trained - stock).abs().max() > 1e-4, "the adapter trained"
    trainer.export(tmp_path / "adapter")
    trainer.close()
    with torch.no_grad():
        torch.testing.assert_close(model(**prompt).logits[:, -1], stock, rtol=0, atol=0)  # close() gives it back
    read_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(**prompt).logits[:, -1], trained, rtol=1e-6, atol=1e-6)


def test_failed_rewards_are_skipped_and_counted(seed):
    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    calls = []

    def flaky(questions, completions, answers):
        calls.append(len(completions))
        return [None if i % 3 == 0 else 0.5 + 0.1 * (i % 2) for i in range(len(completions))]

    config = GRPOConfig(num_generations=4, max_new_tokens=3, layer=K, lora_r=2, lora_alpha=4, seed=seed)
    trainer = Trainer(model, TrainConfig(mode="grpo"), grpo=config, reward=flaky, decode=decode, log=None)
    history = trainer.fit([_batch(seed)] * 2)
    assert calls == [8, 8] and history[-1]["skipped"] == 2 * 3
    assert trainer.step_module.last["advantages"][0] == 0, "a skipped rollout has no advantage"
    trainer.close()


def test_grpo_refusals(seed):
    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        Trainer(model, TrainConfig(mode="grpo"), grpo=GRPOConfig(num_generations=1), reward=low_token_share,
                decode=decode, log=None)  # fmt: skip
    with pytest.raises(ValueError, match="needs reward= and decode="):
        Trainer(model, TrainConfig(mode="grpo"), log=None)
    with pytest.raises(ValueError, match="keep_source='predictor' needs predictor="):
        Trainer(model, TrainConfig(mode="grpo"), grpo=GRPOConfig(keep_source="predictor"), reward=low_token_share,
                decode=decode, log=None)  # fmt: skip
    with pytest.raises(ValueError, match="does not support activation_checkpointing"):
        Trainer(model, TrainConfig(mode="grpo", activation_checkpointing=True), reward=low_token_share, decode=decode,
                log=None)  # fmt: skip
    with pytest.raises(ValueError, match="strategy='fsdp' is not supported"):
        Trainer(model, TrainConfig(mode="grpo", strategy="fsdp"), reward=low_token_share, decode=decode, log=None)
    trainer = _trainer(model, seed)
    no_boxes = {k: v for k, v in _batch(seed).items() if k != "boxes"}
    with pytest.raises(ValueError, match="keep_source='boxes' needs batch\\['boxes'\\]"):
        trainer.fit([no_boxes])
    trainer.close()
    assert all(p.requires_grad for p in model.parameters())
    assert not any("lora" in n for n, _ in model.named_parameters()), "close() takes the adapter out"


def _records(tmp_path, boxes: bool) -> None:
    import json

    from PIL import Image

    with (tmp_path / "data.jsonl").open("w") as f:
        for i in range(4):
            Image.new("RGB", (16 + 4 * i, 16), (50 * i, 200 - 30 * i, 90)).save(tmp_path / f"image{i}.png")
            record = {"image": f"image{i}.png", "question": f"what is in {i}?", "answer": "a square"}
            if boxes:
                record["boxes"] = [[0.1 * i, 0.0, 0.5 + 0.1 * i, 0.6]]
            f.write(json.dumps(record) + "\n")


def _train_cli(tmp_path, *args):
    import subprocess
    import sys

    command = [sys.executable, "-m", "glimpse_ops.hf.train", "--model", str(tmp_path / "model"), "--data",
               str(tmp_path / "data.jsonl"), "--mode", "grpo", "--out", str(tmp_path / "out"), *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_cli_trains_grpo_from_a_jsonl_with_boxes(tmp_path):
    import json

    testing.save_tiny_llava(tmp_path / "model")
    _records(tmp_path, boxes=True)
    done = _train_cli(tmp_path, "--steps", "2", "--batch-size", "2", "--num-generations", "2", "--max-new-tokens",
                      "3", "--lora-r", "2", "--lora-alpha", "4", "--score-layer", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "[2/2] loss" in done.stdout and "reward" in done.stdout
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, 2] and all(0 <= r["reward"] <= 1 for r in history)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoints" / "step-000002.pt").is_file()


def test_the_cli_refuses_bad_grpo_input_before_training(tmp_path):
    testing.save_tiny_llava(tmp_path / "model")
    _records(tmp_path, boxes=False)
    done = _train_cli(tmp_path, "--steps", "1")
    assert done.returncode != 0 and 'data.jsonl:1 needs "boxes"' in done.stderr
    assert not (tmp_path / "out" / "history.jsonl").exists(), "no step ran"
    done = _train_cli(tmp_path, "--reward", "judge")
    assert done.returncode == 2 and "--reward judge needs --judge-url and --judge-model" in done.stderr
    done = _train_cli(tmp_path, "--num-generations", "1")
    assert done.returncode == 2 and "--num-generations must be >= 2" in done.stderr


def test_stage_2_trains_the_glimpse_modules_on_the_merged_llm(seed, tmp_path):
    """GlimpsePrune+'s stage 2: the stage-1 adapter merged into the LLM, then the glimpse token
    and VIP trained there with the glimpse trainer; the release then needs adapter='merged'."""
    from glimpse_ops.glimpseprune import GlimpsePredictor
    from glimpse_ops.hf import pruned, train_glimpse

    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    trainer = _trainer(model, seed)
    trainer.fit([_batch(seed)] * 2)
    trainer.export(tmp_path / "adapter")
    trainer.close()
    read_adapter(model, tmp_path / "adapter").merge()
    predictor = GlimpsePredictor.for_model(model, 3, (1, 0), width=32, cond=32, fuse_heads=2)
    lines = []
    train_glimpse(model, predictor, [testing.qwen_training_batch(seed=seed)] * 2, progress=lines.append)
    assert len(lines) == 2
    x = testing.qwen_inputs(batch=2, text_lengths=[2, 5], seed=seed)
    with pruned(model, predictor=predictor) as handle, torch.no_grad():
        model.generate(**x, max_new_tokens=2, do_sample=False)
        assert handle.last_kept_visual is not None


def test_a_vip_keep_source_prunes_the_rollouts_and_stays_frozen(seed):
    from glimpse_ops.glimpseprune import GlimpsePredictor

    model = testing.tiny_qwen2_5_vl(seed=seed % 1000)
    predictor = GlimpsePredictor.for_model(model, 3, (1, 0), width=32, cond=32, fuse_heads=2)
    config = GRPOConfig(num_generations=2, max_new_tokens=3, lora_r=2, lora_alpha=4, keep_source="predictor", seed=seed)
    trainer = Trainer(model, TrainConfig(mode="grpo"), grpo=config, predictor=predictor, reward=low_token_share,
                      decode=decode, keep_rule={"fixed_keep_ratio": 0.25}, log=None)  # fmt: skip
    assert not any(p.requires_grad for p in predictor.parameters()), "the VIP only chooses: DDP must not wait for it"
    assert trainer.step_module.layer == 3, "the layer K is the predictor's"
    no_boxes = {k: v for k, v in _batch(seed).items() if k != "boxes"}
    trainer.fit([no_boxes])
    assert trainer.step_module.last["kept_visual"].tolist() == [4] * 4, "25% of each prompt's 16 visual tokens"
    trainer.close()
    assert all(p.requires_grad for p in predictor.parameters()), "close() gives the predictor back"
