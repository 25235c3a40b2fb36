"""``python -m glimpse_ops.hf.train``: train the glimpse token + VIP or ATP stages of an HF
model on a JSON-lines file, on one process or under ``torchrun`` (DDP or FSDP2), or
GlimpsePrune+'s GRPO stage 1 (``--mode grpo``: a LoRA on the LLM, DDP or one process).

    torchrun --nproc-per-node 8 -m glimpse_ops.hf.train --model Qwen/Qwen2.5-VL-7B-Instruct \\
        --data train.jsonl --mode glimpse --strategy fsdp --bf16 --steps 2000 --out runs/gp
    torchrun --nproc-per-node 4 -m glimpse_ops.hf.train --model PATH --data viscot.jsonl --mode grpo \\
        --reward judge --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen2.5-32B --bf16 --out runs/gp_plus

Writes under --out: ``checkpoints/step-NNNNNN.pt`` (resumable on any number of processes with
--resume), ``history.jsonl`` (one line per step) and the trained modules (``predictor.safetensors``
for ``pruned(model, predictor=...)``, ``atp_stages.pt``, or for grpo the LoRA adapter in
``adapter/``, PEFT's format).

The losses live in ``losses.py`` and the loop in ``trainer.py``; the names this module held
before (``train_glimpse``, ``glimpse_training_loss``, ...) still resolve here for one release,
with a DeprecationWarning.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def _layers(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m glimpse_ops.hf.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a local folder (or hub id) with the model and its processor")
    p.add_argument("--data", required=True, help="JSON-lines file of {image, question, answer}")
    p.add_argument("--mode", choices=("glimpse", "atp", "grpo"), default="glimpse")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="under torchrun")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=1, help="samples per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--keep-ratio", type=float, default=0.1, help="the budget: the kept fraction of visual tokens")
    p.add_argument("--budget-weight", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true", help="bf16 model and compute, fp32 trainable weights")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument(
        "--attn-implementation",
        default="sdpa",
        help="the model's attention (sdpa, eager; flash_attention_2 and other FlashAttention kernels in atp mode only: "
        "glimpse mode trains through a soft additive mask)",
    )
    p.add_argument("--score-layer", type=int, help="glimpse: the layer K (default: about 2/3 of the depth)")
    p.add_argument("--vit-layers", type=_layers, help="glimpse: ViT blocks the VIP reads, e.g. 31,23,15,7")
    p.add_argument("--atp-layers", type=_layers, help="atp: the stage layers, e.g. 4,14")
    g = p.add_argument_group("grpo (GlimpsePrune+ stage 1)")
    g.add_argument("--reward", choices=("exact", "judge", "exact_or_judge"), default="exact")
    g.add_argument("--judge-url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--judge-model", help="the judge's model name at that endpoint")
    g.add_argument("--judge-timeout", type=float, default=30.0)
    g.add_argument("--keep-source", choices=("boxes", "predictor"), default="boxes",
                   help="boxes: the records' boxes; predictor: --predictor's VIP (adapter off)")  # fmt: skip
    g.add_argument("--predictor", help="a predictor (.safetensors or a release folder) for --keep-source predictor")
    g.add_argument("--num-generations", type=int, default=4)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--beta", type=float, default=0.04, help="the k3 KL weight")
    g.add_argument("--reference", choices=("official", "pruned_base"), default="official")
    g.add_argument("--loss-type", choices=("grpo", "dapo", "dr_grpo"), default="grpo")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--clip", action="store_true", help="PPO's clipped ratio (the official term is unclipped)")
    g.add_argument("--epsilon", type=float, default=0.2)
    g.add_argument("--old-logps", choices=("policy", "sampler"), default="policy")
    g.add_argument("--scale-rewards", choices=("group", "batch", "none"), default="group")
    g.add_argument("--sampling", choices=("per_prompt", "batched"), default="per_prompt")
    g.add_argument("--lora-r", type=int, default=32)
    g.add_argument("--lora-alpha", type=int, default=64)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument(
        "--merge-adapter",
        help="a LoRA adapter folder (PEFT's format, e.g. a --mode grpo run's OUT/adapter) merged into the model "
        "before training: GlimpsePrune+'s stage 2 is --mode glimpse with the stage-1 adapter merged",
    )
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only the last)")
    p.add_argument("--resume", help="a checkpoint written by an earlier run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.mode == "grpo":
        if args.reward != "exact" and not (args.judge_url and args.judge_model):
            p.error(f"--reward {args.reward} needs --judge-url and --judge-model")
        if args.keep_source == "predictor" and not args.predictor:
            p.error("--keep-source predictor needs --predictor")
        if args.num_generations < 2:
            p.error(f"--num-generations must be >= 2 (a group needs a baseline), got {args.num_generations}")
        if args.strategy == "fsdp":
            p.error("--mode grpo runs under DDP or on one process (--strategy ddp)")
    # "flash" in the name: transformers' own test for FlashAttention
    if args.mode in ("glimpse", "grpo") and "flash" in args.attn_implementation:
        p.error(
            f"--mode {args.mode} trains through a 4-D mask on the attention logits, which FlashAttention cannot "
            f"take: --attn-implementation {args.attn_implementation} works with --mode atp; use sdpa here (what "
            "it trains then prunes under FlashAttention)"
        )
    return args


def _micro_batches(
    dataset, collator, batch_size: int, rank: int, world: int, seed: int, skip: int = 0
) -> Iterator[dict]:
    """This rank's micro-batches, epoch after epoch (a DistributedSampler reshuffles each),
    after the first ``skip`` (dropped by index: their images are never loaded). The global
    order does not depend on the world size: step k uses the same samples on any number of
    processes that gives the same samples per step."""
    from torch.utils.data import DistributedSampler

    if len(dataset) < batch_size * world:
        raise ValueError(
            f"glimpse_ops.hf.train: {len(dataset)} records cannot fill a batch of {batch_size} on {world} processes"
        )
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        indices = list(sampler)
        for start in range(0, len(indices) - batch_size + 1, batch_size):
            if skip > 0:
                skip -= 1
                continue
            yield collator([dataset[i] for i in indices[start : start + batch_size]])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..glimpseprune import GlimpsePredictor, default_layer
    from .data import Collator, JsonlDataset
    from .distributed import init_from_env, world
    from .trainer import TrainConfig, Trainer

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    init_from_env(device)
    rank, world_size = world()
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(
        args.model, dtype=dtype, attn_implementation=args.attn_implementation
    ).to(device)
    processor = AutoProcessor.from_pretrained(args.model)
    if args.merge_adapter:
        from .lora import read_adapter

        read_adapter(model, args.merge_adapter).merge()
    predictor = None
    if args.mode == "glimpse":
        n_layers = model.config.get_text_config().num_hidden_layers
        depth = getattr(model.config.vision_config, "depth", None) or model.config.vision_config.num_hidden_layers
        K = args.score_layer if args.score_layer is not None else default_layer(n_layers)
        step = max(1, depth // 4)  # default: four blocks evenly spaced, ending at the last (7B: 31, 23, 15, 7)
        vit = args.vit_layers or tuple(sorted({max(0, depth - 1 - i * step) for i in range(4)}, reverse=True))
        predictor = GlimpsePredictor.for_model(model, K, vit)
    extra = {}
    if args.mode == "grpo":
        extra = _grpo_arguments(args, processor, rank)
        if args.keep_source == "predictor":
            from ..glimpseprune import load_predictor

            predictor = load_predictor(args.predictor, model, "python -m glimpse_ops.hf.train")
    config = TrainConfig(
        mode=args.mode, strategy=args.strategy, keep_ratio=args.keep_ratio, budget_weight=args.budget_weight,
        lr=args.lr, grad_accum=args.grad_accum, precision="bf16" if args.bf16 else "fp32",
        activation_checkpointing=args.activation_checkpointing, save_every=args.save_every,
    )  # fmt: skip
    out = Path(args.out)
    history_file = out / "history.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        how = f"{world_size} processes ({args.strategy})" if world_size > 1 else "1 process"
        print(f"glimpse_ops.hf.train: {args.mode} on {how}: {args.model}, {args.data}")
    trainer = Trainer(model, config, predictor=predictor, atp_layers=args.atp_layers, **extra)
    trainer.global_batch = args.batch_size * world_size * args.grad_accum
    if args.resume:
        trainer.resume(args.resume)
    dataset = JsonlDataset(args.data, require_boxes=args.mode == "grpo" and args.keep_source == "boxes")
    done = trainer.step * args.grad_accum  # micro-batches per rank the resumed steps used
    collator = Collator(processor, grpo=args.mode == "grpo")
    batches = _micro_batches(dataset, collator, args.batch_size, rank, world_size, args.seed, done)

    def record(step: dict) -> None:  # one line per step, so a run cut short keeps its history
        if rank == 0:
            with history_file.open("a") as f:
                f.write(json.dumps(step) + "\n")

    trainer.fit(batches, args.steps, checkpoint_dir=out / "checkpoints", skip_done=False, on_step=record)
    exported = {"glimpse": "predictor.safetensors", "atp": "atp_stages.pt", "grpo": "adapter"}[args.mode]
    trainer.export(out / exported)
    if rank == 0:
        print(f"glimpse_ops.hf.train: wrote {out}")
    trainer.close()
    from .distributed import shutdown

    shutdown()
    return 0


def _grpo_arguments(args: argparse.Namespace, processor, rank: int) -> dict:
    """The Trainer's grpo arguments from the command line; the judge is asked once first."""
    from .grpo_step import GRPOConfig
    from .rewards import LLMJudge, exact_match

    tokenizer = processor.tokenizer
    if args.reward == "exact":
        reward = exact_match
    else:
        reward = LLMJudge(args.judge_url, args.judge_model, timeout=args.judge_timeout,
                          exact_first=args.reward == "exact_or_judge")  # fmt: skip
        reward.check()  # a judge that does not answer stops the run here, before any step
    grpo = GRPOConfig(
        num_generations=args.num_generations, max_new_tokens=args.max_new_tokens, beta=args.beta,
        temperature=args.temperature, clip=args.clip, epsilon=args.epsilon, old_logps=args.old_logps,
        scale_rewards=args.scale_rewards, sampling=args.sampling,
        reference=args.reference, loss_type=args.loss_type, keep_source=args.keep_source,
        layer=args.score_layer, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        seed=args.seed,
    )  # fmt: skip
    # eos_token_id: the Trainer's default, the generation config's ids (generate stops on each;
    # the tokenizer's single id can be the pad id of another, whose padding would then count)
    return {"grpo": grpo, "reward": reward, "decode": lambda ids: tokenizer.decode(ids, skip_special_tokens=True)}


# what ``glimpse_ops.hf.train`` held before the command took its name: name -> its module now
_MOVED = {
    "train_glimpse": "trainer",
    **{name: "losses" for name in ("LossTerms", "answer_ce_sum", "glimpse_loss_terms", "glimpse_training_loss",
                                   "prompt_and_answer", "soft_masks")},
}  # fmt: skip


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    from .._moved import warn_moved

    warn_moved(f"{__name__}.{name}", f"glimpse_ops.hf.{_MOVED[name]}.{name}")
    return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)


if __name__ == "__main__":
    import sys

    sys.exit(main())
