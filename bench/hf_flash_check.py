"""Pruning under FlashAttention against pruning under sdpa, on the real kernel: tiny random HF
models (Qwen2.5-VL, Qwen3-VL, LLaVA), a left-padded batch of 2, training-free GlimpsePrune at
25% kept; the same model pruned under sdpa and then under the FlashAttention implementation.
Where both keep the same tokens the logits of the prefill and of every greedy decode step
must agree (bf16: FlashAttention and sdpa round differently, so a share of near-tied kept
positions may differ; fp32 only with --stand-in).

    python bench/hf_flash_check.py --json out.json                     # on a GPU with flash-attn
    python bench/hf_flash_check.py --stand-in --device cpu --dtype fp32 # CPU: the plain-PyTorch stand-in

The left-padded varlen path after the prune (``cu_seqlens`` from the compacted mask) is what
B = 1 benches never reach; tests/hf/test_hf_flash.py checks it on CPU against the stand-in
only. Exit status 1 when a family fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava")
KEEP_RATIO = 0.25
# bf16: the share of kept positions that may differ, and max |logit diff| / max |logit| where they agree
INDEX_MISMATCH = {torch.float32: 0.0, torch.bfloat16: 0.05, torch.float16: 0.05}
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _model_and_inputs(family: str, device: str, dtype: torch.dtype, seed: int):
    from glimpse_ops.hf import testing

    build, inputs = {
        "qwen2_5_vl": (testing.tiny_qwen2_5_vl, testing.qwen_inputs),
        "qwen3_vl": (testing.tiny_qwen3_vl, testing.qwen_inputs),
        "llava": (testing.tiny_llava, testing.llava_inputs),
    }[family]
    model = build("sdpa", seed=seed).to(device, dtype)
    x = inputs(batch=2, text_lengths=[2, 6], seed=seed)
    return model, {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in x.items()}


def _pruned_run(model, x) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept index [B, L], per-step logits [steps, B, V] fp32, greedy tokens [B, S + steps])."""
    from glimpse_ops import hf

    with hf.pruned(model, max_keep_ratio=KEEP_RATIO) as handle, torch.no_grad():
        out = model.generate(**x, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)  # fmt: skip
        return handle.last_index.clone(), torch.stack(out.logits).float(), out.sequences


def check_family(family: str, implementation: str, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    model, x = _model_and_inputs(family, device, dtype, seed)
    index_sdpa, logits_sdpa, tokens_sdpa = _pruned_run(model, x)
    model.set_attn_implementation(implementation)
    index_flash, logits_flash, tokens_flash = _pruned_run(model, x)
    same_shape = index_flash.shape == index_sdpa.shape
    mismatch = float((index_flash != index_sdpa).float().mean()) if same_shape else 1.0
    scale = logits_sdpa.abs().max().item() or 1.0
    # the steps up to the first token both runs chose differently (a near-tie may flip one)
    agree = (tokens_flash == tokens_sdpa).all(dim=0)[x["input_ids"].shape[1] :]
    steps = min(int(agree.long().cumprod(0).sum()) + 1, len(agree))
    diff = (logits_flash[:steps] - logits_sdpa[:steps]).abs().max().item() if mismatch == 0.0 else None
    ok = mismatch <= INDEX_MISMATCH[dtype] and (diff is None or diff <= LOGIT_TOLERANCE[dtype] * scale)
    return {
        "family": family,
        "attention": implementation,
        "dtype": str(dtype).removeprefix("torch."),
        "kept_index_mismatch": mismatch,
        "max_logit_diff": diff,
        "logit_scale": scale,
        "steps_compared": steps,
        "ok": ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--implementation", default="flash_attention_2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument(
        "--stand-in", action="store_true", help="use tests/hf/plain_flash.py as the kernel (CPU; needs pytest)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    patch = None
    if args.stand_in:
        import pytest

        sys.path.insert(0, str(ROOT / "tests" / "hf"))
        import plain_flash

        patch = pytest.MonkeyPatch()
        plain_flash.install(patch)
    rows = []
    try:
        for family in args.families:
            try:
                row = check_family(family, args.implementation, args.device, dtype)
            except (ImportError, ValueError, RuntimeError) as exc:
                row = {"family": family, "attention": args.implementation, "ok": False, "error": str(exc)[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if patch is not None:
            patch.undo()
    if args.json:
        args.json.write_text(json.dumps({"results": rows}, indent=1))
    bad = [r["family"] for r in rows if not r["ok"]]
    print("hf_flash_check: " + (f"FAILED for {', '.join(bad)}" if bad else f"{len(rows)} families agree"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
