"""A training run for ``test_hf_distributed.py``: run it with ``torchrun --nproc-per-node N``
or plainly (one process). Every step's global batch is the same whatever N is: rank r takes
samples r*b .. (r+1)*b - 1 of each, so the runs must agree to fp32 tolerance.

Rank 0 writes (torch.save) the first step's gradients, the final trainable parameters and
the step records to --out."""

from __future__ import annotations

import argparse

import torch

from glimpse_ops.glimpseprune import GlimpsePredictor
from glimpse_ops.hf import testing
from glimpse_ops.hf.distributed import _full, shutdown, world
from glimpse_ops.hf.trainer import TrainConfig, Trainer

# visual tokens per sample: 16, 16, 4, 4 (8x8 and 4x4 patch images): at step 1 rank 0 holds
# 32 and rank 1 8, so a mean of per-rank kept fractions is not the global fraction
IMAGES = [[(8, 8)], [(8, 8)], [(4, 4)], [(4, 4)]]


def global_batch(step: int, accum: int, micro: int) -> dict:
    images = [IMAGES[(step * accum + micro + b) % len(IMAGES)] for b in range(len(IMAGES))]
    x = testing.qwen_image_inputs(images, text_lengths=[2, 4, 3, 5], seed=100 * step + micro)
    answers = torch.randint(3, 200, (len(images), 3), generator=torch.Generator().manual_seed(step))
    answers[1, 2] = -100  # one padded answer slot: the CE is a mean over real answer tokens
    return {**x, "answer_ids": answers}


def grpo_batch(step: int, accum: int, micro: int) -> dict:
    """``global_batch`` as GRPO prompts: questions, answers and one box per image."""
    x = {k: v for k, v in global_batch(step, accum, micro).items() if k != "answer_ids"}
    B = x["input_ids"].shape[0]
    boxes = [[[0.0, 0.0, 0.5 + 0.1 * b, 0.7]] for b in range(B)]
    return {**x, "questions": [f"q{b}" for b in range(B)], "answers": ["a"] * B, "boxes": boxes}


def low_token_share(questions, completions, answers) -> list[float]:
    return [sum(int(t) < 128 for t in c.split()) / max(1, len(c.split())) for c in completions]


def rank_slice(batch: dict, rank: int, world_size: int) -> dict:
    """Samples rank*b .. (rank+1)*b - 1 (one image per sample; pixel rows by each image's grid)."""
    B = batch["input_ids"].shape[0]
    b = B // world_size
    rows = slice(rank * b, (rank + 1) * b)
    patches = batch["image_grid_thw"].prod(dim=1).tolist()
    start = sum(patches[: rank * b])
    out = {k: v[rows] for k, v in batch.items() if k not in ("pixel_values",)}  # (lists slice too)
    out["pixel_values"] = batch["pixel_values"][start : start + sum(patches[rows])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="glimpse")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="the model in bf16, autocast, fp32 trainable weights")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    model = testing.tiny_qwen2_5_vl(seed=3)
    if args.bf16:
        model = model.to(torch.bfloat16)
    torch.manual_seed(4)
    predictor = GlimpsePredictor.for_model(model, 3, (1, 0), width=32, cond=32, fuse_heads=2)
    config = TrainConfig(mode=args.mode, strategy=args.strategy, keep_ratio=0.2, budget_weight=2.0, lr=1e-2,
                         grad_accum=args.accum, activation_checkpointing=args.checkpointing,
                         save_every=args.save_every, precision="bf16" if args.bf16 else "fp32")  # fmt: skip
    torch.manual_seed(5)  # the ATP stages' initial weights
    grpo = {}
    if args.mode == "grpo":
        from glimpse_ops.hf.grpo_step import GRPOConfig

        config_grpo = GRPOConfig(num_generations=2, max_new_tokens=3, layer=2, lora_r=2, lora_alpha=4,
                                 lora_dropout=0.0, seed=7)  # fmt: skip
        grpo = dict(grpo=config_grpo, reward=low_token_share, decode=lambda ids: " ".join(map(str, ids)),
                    eos_token_id=testing.EOS)  # fmt: skip
    trainer = Trainer(model, config, predictor=predictor if args.mode == "glimpse" else None,
                      atp_layers=(1, 3) if args.mode == "atp" else None, **grpo)  # fmt: skip
    # the last decoder layer's attention calls: activation checkpointing adds one per backward
    # (a hook on the layer itself would not see it where transformers checkpoints forward, 5.2x)
    calls = []
    model.model.language_model.layers[-1].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    rank, world_size = world()
    make = grpo_batch if args.mode == "grpo" else global_batch
    batches = [
        rank_slice(make(step, args.accum, micro), rank, world_size)
        for step in range(args.steps)
        for micro in range(args.accum)
    ]
    grads = None
    if args.resume:
        trainer.resume(args.resume)
    else:  # the first step by hand, to keep its gradients (Adam's first update hides their scale)
        trainer.optimizer.zero_grad(set_to_none=True)
        for micro in range(args.accum):
            trainer._micro_step(batches[micro], micro == args.accum - 1)
        grads = {n: _full(p.grad) for n, p in trainer.trainable.named_parameters()}
        trainer.optimizer.step()
        trainer.step = 1
    history = trainer.fit(batches, args.steps, checkpoint_dir=args.checkpoint_dir)
    params = {n: _full(p) for n, p in trainer.trainable.named_parameters()}
    optimizer_dtypes = {str(v.dtype) for state in trainer.optimizer.state.values() for v in state.values()
                        if torch.is_tensor(v) and v.dim() > 0}  # fmt: skip
    if rank == 0:
        torch.save(
            {
                "grads": grads,
                "params": params,
                "history": history,
                "world": world_size,
                "layer_calls": len(calls),
                "optimizer_dtypes": optimizer_dtypes,
            },  # fmt: skip
            args.out,
        )
    trainer.close()
    shutdown()


if __name__ == "__main__":
    main()
