"""Fidelity of visual-token pruning on the reference LVLM and the synthetic task.

    python bench/fidelity.py --json PATH    # the full run (under 15 minutes on 2 CPU cores)
    python bench/fidelity.py --quick        # a shorter run (under 3 minutes)
    python bench/fidelity.py --save trained.pt  # also keep the weights (python -m glimpse_ops.demo --weights)

Trains the tiny LVLM on the task (glimpse_ops.lvlm.task: the answer is the shape of the one
cell whose color the question names), then the glimpse token and VIP with the LM frozen,
and reports accuracy against the fraction of visual tokens kept for: the unpruned baseline,
GlimpsePrune (VIP sigmoid > 0.5, capped at 10%), the training-free glimpse top-k at the
same budget, random keeping at the same budget, and ATP (threshold MLPs trained through
soft masks with a budget loss, LM frozen; hard pruning at inference) at two budgets, about
25% and 12% of the visual tokens, with the kept fraction per layer. Targets: GlimpsePrune
keeps >= 99% of the baseline accuracy with <= 10% of the visual tokens, while random
keeping falls short; ATP keeps >= 98% with <= 25%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from glimpse_ops.lvlm import (
    LVLM,
    ATPPruner,
    GlimpsePruner,
    GlimpseTopK,
    RandomPruner,
    evaluate,
    tiny,
    train_atp,
    train_glimpse_pruner,
    train_lvlm,
)  # noqa: E402
from glimpse_ops.lvlm.checkpoint import save_trained  # noqa: E402
from glimpse_ops.progress import Progress  # noqa: E402

ATP_TARGETS = (0.25, 0.11)  # kept fractions the budget loss aims at (the second lands near 12-14%)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer training steps and evaluation samples")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--save", type=Path, default=None, help="save the trained LVLM and GlimpsePruner here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-ratio", type=float, default=0.10, help="GlimpsePrune's cap on the kept fraction")
    parser.add_argument(
        "--steps",
        type=int,
        nargs=3,
        metavar=("LVLM", "GLIMPSE", "SAMPLES"),
        default=None,
        help="override the training steps and evaluation samples",
    )
    parser.add_argument(
        "--atp-steps", type=int, default=None, help="ATP training steps per budget (default 400, --quick 200)"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    lvlm_steps, glimpse_steps, samples = (1300, 2200, 256) if args.quick else (1500, 3000, 1024)
    if args.steps is not None:
        lvlm_steps, glimpse_steps, samples = args.steps
    atp_steps = args.atp_steps if args.atp_steps is not None else (200 if args.quick else 400)
    config = tiny()
    model = LVLM(config)
    pruner = GlimpsePruner(model, threshold=0.5, max_keep_ratio=args.keep_ratio, min_keep=1)
    progress = Progress(lvlm_steps + glimpse_steps + 4 + len(ATP_TARGETS) * (atp_steps + 1))
    start = time.perf_counter()
    train_lvlm(model, lvlm_steps, seed=args.seed, progress=progress.step)
    train_glimpse_pruner(model, pruner, glimpse_steps, seed=args.seed + 1, progress=progress.step)
    pruner.eval()
    if args.save is not None:
        save_trained(args.save, model, pruner)

    baseline = evaluate(model, None, samples)
    progress.step("baseline")
    glimpse = evaluate(model, pruner, samples)
    progress.step("glimpseprune")
    budget = max(1, round(glimpse["kept_fraction"] * config.visual_tokens))
    topk = evaluate(model, GlimpseTopK(budget), samples)
    progress.step("glimpse_topk")
    random = evaluate(model, RandomPruner(budget, torch.Generator().manual_seed(args.seed)), samples)
    progress.step("random")

    methods = [
        {"name": "glimpseprune", **glimpse},
        {"name": "glimpse_topk", **topk},
        {"name": "random", **random},
    ]
    stage = (config.text_sees_image_from,)  # the first layer whose text rows see the image
    for fraction in ATP_TARGETS:
        target = fraction * config.visual_tokens
        atp = ATPPruner(model, stage)
        train_atp(model, atp, atp_steps, target, seed=args.seed + 2, progress=progress.step)
        methods.append(
            {
                "name": "atp",
                "target_kept_fraction": fraction,
                "stage_layers": list(stage),
                **evaluate(model, atp.eval(), samples),
            }
        )
        progress.step(f"atp {fraction:.0%}")
    result = {
        "task": f"shape of the cell of the named color, {config.grid}x{config.grid} grid "
        f"({config.visual_tokens} visual tokens)",
        "baseline_accuracy": baseline["accuracy"],
        "methods": methods,
        "budget_tokens": budget,
        "samples": samples,
        "seconds": round(time.perf_counter() - start, 1),
        "quick": args.quick,
    }
    print(f"\nbaseline accuracy {baseline['accuracy']:.3f} (all {config.visual_tokens} visual tokens)")
    print(f"{'method':<14} {'kept':>7} {'accuracy':>9} {'of baseline':>12}")
    for m in methods:
        share = m["accuracy"] / baseline["accuracy"] if baseline["accuracy"] else math.nan
        label = m["name"] + (f" ({m['target_kept_fraction']:.0%})" if "target_kept_fraction" in m else "")
        print(f"{label:<14} {m['kept_fraction']:>7.1%} {m['accuracy']:>9.3f} {share:>11.1%}")
    for m in methods:
        if "kept_per_layer" in m:
            print(
                f"{m['name']} (target {m['target_kept_fraction']:.0%}) kept per layer: "
                + " ".join(f"{x:.0%}" for x in m["kept_per_layer"])
            )
    met = glimpse["kept_fraction"] <= 0.10 + 1e-9 and glimpse["accuracy"] >= 0.99 * baseline["accuracy"]
    atp_met = any(
        m["name"] == "atp" and m["kept_fraction"] <= 0.25 + 1e-9 and m["accuracy"] >= 0.98 * baseline["accuracy"]
        for m in methods
    )
    print(f"GlimpsePrune target (>= 99% of baseline with <= 10% kept): {'met' if met else 'not met'}")
    print(
        f"ATP target (>= 98% of baseline with <= 25% kept): {'met' if atp_met else 'not met'}; "
        f"took {result['seconds']:.0f}s"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
