"""Step time and memory per rank of the distributed trainers (``glimpse_ops.hf.trainer``).

    torchrun --standalone --nproc-per-node 2 bench/train_distributed.py --mode glimpse --strategy fsdp
    python bench/train_distributed.py --mode atp          # one process, for comparison

The model is ``hf_families``' small random Qwen2.5-VL on a CPU (its 7B shapes in bf16 on a
GPU, ``--preset 7b_shapes``), each rank a batch of ``--batch`` samples of ``--visual`` visual
tokens. Prints, from rank 0, the median step time with its p20-p80 spread, each rank's peak
resident memory (CPU) or peak allocated memory (GPU), and the model bytes each rank holds at
rest (FSDP2 shards them); ``--json`` writes the same.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_families import FAMILIES  # noqa: E402
from timing import quantiles  # noqa: E402

from glimpse_ops.glimpseprune import GlimpsePredictor, default_layer  # noqa: E402
from glimpse_ops.hf.distributed import world  # noqa: E402
from glimpse_ops.hf.trainer import TrainConfig, Trainer  # noqa: E402


def _held_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters this rank stores (a DTensor counts its local shard)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in module.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("glimpse", "atp"), default="glimpse")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--visual", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(0)
    with torch.device(device):
        model = FAMILIES["qwen2_5_vl"].build(args.preset)
    model.config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(dtype).eval()
    n_layers = model.config.text_config.num_hidden_layers
    K = default_layer(n_layers)
    depth = model.config.vision_config.depth
    predictor = GlimpsePredictor.for_model(model, K, (depth - 1, 0)) if args.mode == "glimpse" else None
    config = TrainConfig(mode=args.mode, strategy=args.strategy, lr=1e-4, activation_checkpointing=args.checkpointing,
                         precision="bf16" if dtype == torch.bfloat16 else "fp32")  # fmt: skip
    trainer = Trainer(model, config, predictor=predictor, atp_layers=(2, K) if args.mode == "atp" else None, log=None)
    rank, world_size = world()
    g = torch.Generator().manual_seed(rank)
    x = FAMILIES["qwen2_5_vl"].inputs(args.visual, args.batch, 32, g, args.preset)
    batch = {**x, "answer_ids": torch.randint(1000, 30000, (args.batch, 8), generator=g)}
    history = trainer.fit([batch] * args.steps, args.steps)
    times = quantiles([1e3 * r["seconds"] for r in history[1:]])  # the first step warms up
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    mine = torch.tensor([peak, _held_bytes(model) / 2**20])
    every = [torch.zeros_like(mine) for _ in range(world_size)]
    if world_size > 1:
        dist.all_gather(every, mine)
    else:
        every = [mine]
    result = {
        "mode": args.mode, "strategy": args.strategy if world_size > 1 else "one process", "ranks": world_size,
        "preset": args.preset, "visual": args.visual, "batch_per_rank": args.batch, "device": device.type,
        "checkpointing": args.checkpointing, "step_ms": times,
        "peak_mib_per_rank": [round(float(v[0]), 1) for v in every],
        "model_mib_held_per_rank": [round(float(v[1]), 1) for v in every],
    }  # fmt: skip
    if rank == 0:
        print(
            f"{args.mode} {result['strategy']} x{world_size}: step {times['p50']:.0f} ms "
            f"(p20-p80 {times['p20']:.0f}-{times['p80']:.0f}); peak {result['peak_mib_per_rank']} MiB per rank; "
            f"model held {result['model_mib_held_per_rank']} MiB per rank"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
