"""End-to-end speed of the reference LVLM with and without GlimpsePrune (bench/run.py --e2e).

Three providers on the same model and weights (random: speed only):

* ``unpruned``: the plain prefill, then decoding on the full cache.
* ``glimpse_ops``: GlimpsePruner (glimpse_scores, VIP, prune_kv, gather_tokens; no host sync).
* ``eager``: the same pruning written like the public GlimpsePrune code: the glimpse row by
  ``repeat_kv`` + matmul, boolean indexing of the visual columns, top-k + sort, per-layer
  per-sample ``index_select`` of layers 0..K and boolean indexing of hidden states.

Per case: prefill latency, decode tokens/s, KV-cache bytes after prefill and (GPU) peak
memory, plus the pruning overhead (scores + VIP + select + compact, timed on a fixed
prefix) as a share of the pruned prefill. The GPU cases are Qwen2.5-VL-7B shapes in bf16
at 4k and 16k visual tokens, B=1 and 8, 7.4% kept; the CPU cases are the same structure
at a small size in fp32.

Training steps (ATP, B=1): forward + backward of the answer loss with the LM tuned, for
``unmasked`` (the plain model), ``atp_soft_mask`` (ATP stages at 1/4 and 1/2 of the depth,
soft masks through ``soft_mask_attention``) and ``atp_sdpa_dense_mask`` (the same soft
masks as an additive log-weight [B, 1, S, S] mask in SDPA, the peer to beat).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import peers
import torch
import torch.nn.functional as F
from timing import no_compiles, peak_mib, quantiles, settle, spread_text, sync, time_ms
from torch import Tensor

from glimpse_ops.layers import attention_mask
from glimpse_ops.lvlm import LVLM, ATPPruner, GlimpsePruner, LVLMConfig, qwen2_5_vl_7b_shapes
from glimpse_ops.lvlm.model import Compacted, Prefix
from glimpse_ops.lvlm.task import BOS, IMAGE
from glimpse_ops.progress import Progress

KEEP_RATIO = 0.074
TEXT_TOKENS = 256


def small_config() -> LVLMConfig:
    """The CPU stand-in: Qwen-like structure (GQA 4:1, pruning at ~2/3 depth), small widths."""
    return LVLMConfig(
        image_size=64,
        patch=2,
        vit_dim=64,
        vit_layers=2,
        vit_heads=2,
        vit_window=False,
        hidden=256,
        layers=9,
        heads=8,
        kv_heads=2,
        head_dim=32,
        ffn=704,
        vocab=1024,
        prune_layer=6,
        vip_width=64,
    )


@dataclass(frozen=True)
class E2ECase:
    preset: str
    visual: int
    batch: int
    dtype: torch.dtype
    text: int
    decode_steps: int

    def name(self) -> str:
        size = f"{self.visual // 1024}k" if self.visual >= 1024 else str(self.visual)
        return f"e2e {self.preset} {size} B={self.batch}"

    def config(self) -> LVLMConfig:
        base = qwen2_5_vl_7b_shapes() if self.preset == "qwen2_5_vl_7b_shapes" else small_config()
        grid = math.isqrt(self.visual)
        return dataclasses.replace(base, image_size=grid * 2 * base.patch)

    def as_dict(self) -> dict:
        return {
            "preset": self.preset,
            "visual": self.visual,
            "batch": self.batch,
            "dtype": str(self.dtype).removeprefix("torch."),
            "text": self.text,
            "decode_steps": self.decode_steps,
            "keep_ratio": KEEP_RATIO,
        }


def e2e_cases(device: str, smoke: bool) -> list[E2ECase]:
    if device == "cuda":
        grid = [(4096, 1), (4096, 8), (16384, 1), (16384, 8)]
        return [
            E2ECase("qwen2_5_vl_7b_shapes", v, b, torch.bfloat16, TEXT_TOKENS, 32)
            for v, b in grid[: 1 if smoke else None]
        ]
    grid = [(256, 1), (256, 4), (1024, 1), (1024, 4)]
    return [E2ECase("small", v, b, torch.float32, 64, 8) for v, b in grid[: 1 if smoke else None]]


def make_prompt(case: E2ECase, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """(images [B, 3, H, W], input_ids [B, S]: BOS, the image, random text; mask [B, S])."""
    c = case.config()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(case.batch, 3, c.image_size, c.image_size, generator=g)
    text = torch.randint(8, c.vocab, (case.batch, case.text), generator=g)
    ids = torch.cat([torch.full((case.batch, 1), BOS), torch.full((case.batch, case.visual), IMAGE), text], dim=1)
    return images.to(device, case.dtype), ids.to(device), torch.ones_like(ids, dtype=torch.bool, device=device)


class EagerGlimpsePrune:
    """GlimpsePrune's pruning step written the way the public code does it (see module doc)."""

    def __init__(self, pruner: GlimpsePruner) -> None:
        self.pruner = pruner

    def prune_prefix(self, model: LVLM, prefix: Prefix) -> Compacted:
        c = model.config
        B, S = prefix.visual.shape
        q = prefix.glimpse_q[:, :, -1:]
        k = peers.repeat_kv(prefix.caches[c.prune_layer][0], c.heads // c.kv_heads)
        logits = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(c.head_dim)  # [B, H, 1, S + 1]
        head_scores = logits[:, :, 0, :S].transpose(1, 2)[prefix.visual].view(B, c.visual_tokens, c.heads).float()
        probs = torch.sigmoid(self.pruner.vip(head_scores, prefix.taps).float())
        scores = torch.zeros(B, S, device=probs.device)
        scores[prefix.visual] = probs.flatten()
        max_keep = max(1, math.ceil(self.pruner.max_keep_ratio * c.visual_tokens))
        keep = peers.eager_select(scores, prefix.visual, max_keep)
        keys = [kv[0][:, :, :S] for kv in prefix.caches]
        values = [kv[1][:, :, :S] for kv in prefix.caches]
        new_keys, new_values, index = peers.eager_compact(keys, values, keep)
        lengths = keep.sum(dim=1)
        longest = index.shape[1]

        def take(x: Tensor, pad) -> Tensor:  # per-sample boolean indexing, left re-pad
            out = torch.full((B, longest, *x.shape[2:]), pad, dtype=x.dtype, device=x.device)
            for b in range(B):
                kept = x[b, :S][keep[b]]
                out[b, longest - kept.shape[0] :] = kept
            return out

        return Compacted(
            take(prefix.hidden, 0.0),
            take(prefix.positions, 0),
            take(prefix.valid, False),
            take(prefix.visual, False),
            list(zip(new_keys, new_values)),
            index,
            lengths,
            keep,
        )


def _build_model(config: LVLMConfig, device: str, dtype: torch.dtype) -> LVLM:
    """Random weights initialized on the device itself (7B shapes take minutes on a CPU)."""
    with torch.device(device):
        return LVLM(config).to(dtype)


def _decode_rate(prefill: Callable[[], tuple], model: LVLM, steps: int, batch: int, device: str, reps: int) -> dict:
    """Decode tokens/s (p20, p50, p80 over ``reps`` runs of ``steps`` single-token steps after
    one prefill each; the first run warms up until nothing compiles)."""

    def run() -> float:
        logits, state = prefill()[:2]
        token = logits.argmax(-1)
        sync(device)
        begin = time.perf_counter()
        for _ in range(steps):
            token = model.decode_step(token, state).argmax(-1)
        sync(device)
        return batch * steps / (time.perf_counter() - begin)

    settle(run, "decode")
    with no_compiles("while timing decode steps"):
        return quantiles([run() for _ in range(reps)])


# max |logit diff| / max |logit| allowed between glimpse_ops and the eager pipeline, which keep
# the same tokens (required) and so finish the prefill on the same copied rows: measured 0 in
# fp32 on CPU (bench/results/cpu-x86-64-2cores/*-e2e.json); bf16 on a GPU is provisional
PRUNE_LOGIT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
# soft_mask_attention against dense-mask SDPA in the ATP training step, relative to max |logit|:
# measured 3.3e-7 (6e-7 at scale 1.8) in fp32 on CPU, margin 30x; bf16 provisional (one bf16
# rounding of P in each of the model's attention layers)
ATP_LOGIT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _two_steps(model: LVLM, compacted: Compacted) -> Tensor:
    """Logits [2, B, V] of the pruned prefill (from the kept hidden states) and of one greedy
    decode step (from the compacted caches of layers 0..K)."""
    logits, state, _ = compacted.finish(model)
    return torch.stack([logits, model.decode_step(logits.argmax(-1), state)]).float()


def _check(model: LVLM, ours: Compacted, eager: Compacted, dtype: torch.dtype) -> tuple[bool, str]:
    same = ours.index.shape == eager.index.shape and bool((ours.index == eager.index).all())
    logits_ours, logits_eager = _two_steps(model, ours), _two_steps(model, eager)
    diff = (logits_ours - logits_eager).abs().max().item()
    scale = logits_ours.abs().max().item() + 1e-6
    ok = same and diff <= PRUNE_LOGIT_TOLERANCE[dtype] * scale
    return ok, f"same kept positions: {same}; max |logit diff| {diff:.2e} (scale {scale:.2e})"


def run_e2e_case(case: E2ECase, device: str, budget_s: float, progress: Progress) -> list[dict]:
    torch.manual_seed(0)
    config = case.config()
    model = _build_model(config, device, case.dtype).eval()
    with torch.device(device):
        pruner = GlimpsePruner(model, threshold=None, max_keep_ratio=KEEP_RATIO, min_keep=1).to(case.dtype).eval()
    eager = EagerGlimpsePrune(pruner)
    images, ids, mask = make_prompt(case, device)
    base = {"case": case.as_dict(), "name": case.name()}
    rows: list[dict] = []
    with torch.no_grad():
        prefix = pruner.glimpse_prefix(model, images, ids, mask)
        ours_c, eager_c = pruner.prune_prefix(model, prefix), eager.prune_prefix(model, prefix)
        ok, note = _check(model, ours_c, eager_c, case.dtype)
        del ours_c, eager_c
        prefills: dict[str, Callable[[], tuple]] = {
            "unpruned": lambda: model.prefill(images, ids, mask),
            "glimpse_ops": lambda: pruner.prefill(model, images, ids, mask),
            "eager": lambda: eager.prune_prefix(model, pruner.glimpse_prefix(model, images, ids, mask)).finish(model),
        }
        overheads = {
            "glimpse_ops": lambda: pruner.prune_prefix(model, prefix),
            "eager": lambda: eager.prune_prefix(model, prefix),
        }
        for name, prefill in prefills.items():
            row = {**base, "provider": name, "check": note if name != "unpruned" else "-"}
            if name != "unpruned" and not ok:  # which of the two is wrong is unknown: both fail
                row["error"] = f"failed the correctness gate: {note}"
                rows.append(row)
                progress.step(f"{case.name()} {name}: FAILED GATE")
                continue
            try:
                row["peak_mib"] = peak_mib(prefill, device)
                row["prefill"] = time_ms(prefill, device, budget_s)
                row["prefill_ms"] = row["prefill"]["p50"]
                state = prefill()[1]
                row["kv_cache_bytes"] = state.cache_bytes()
                row["kv_cache_mib"] = round(row["kv_cache_bytes"] / 2**20, 2)
                del state
                row["decode"] = _decode_rate(prefill, model, case.decode_steps, case.batch, device, 5)
                row["decode_tok_s"] = row["decode"]["p50"]
                if name in overheads:
                    row["overhead_ms"] = time_ms(overheads[name], device, budget_s)["p50"]
                    row["overhead_share"] = row["overhead_ms"] / row["prefill_ms"]
            except torch.OutOfMemoryError as exc:
                row["error"] = f"out of memory: {str(exc)[:200]}"
            rows.append(row)
            progress.step(f"{case.name()} {name}")
    full = next((r for r in rows if r["provider"] == "unpruned" and "prefill_ms" in r), None)
    eager_row = next((r for r in rows if r["provider"] == "eager" and "prefill_ms" in r), None)
    for row in rows:
        if full and "prefill_ms" in row:
            row["prefill_vs_unpruned"] = full["prefill_ms"] / row["prefill_ms"]
            row["decode_vs_unpruned"] = row["decode_tok_s"] / full["decode_tok_s"]
            row["kv_cache_share"] = row["kv_cache_bytes"] / full["kv_cache_bytes"]
        if eager_row and "prefill_ms" in row:
            row["prefill_vs_eager"] = eager_row["prefill_ms"] / row["prefill_ms"]
    return rows


def print_e2e_table(rows: list[dict]) -> None:
    header = (
        f"{'case':<36} {'provider':<12} {'prefill ms':>10} {'spread':>6} {'vs eager':>8} {'decode tok/s':>12} "
        f"{'spread':>6} {'vs full':>8} "
        f"{'KV MiB':>8} {'KV share':>8} {'overhead':>9} {'peak MiB':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    last = None
    for row in rows:
        name = row["name"] if row["name"] != last else ""
        last = row["name"]
        if "prefill_ms" not in row:
            print(f"{name:<36} {row['provider']:<12} {row.get('error', 'skipped')[:80]}")
            continue
        overhead = f"{100 * row['overhead_share']:.1f}%" if "overhead_share" in row else "-"
        peak = f"{row['peak_mib']:.0f}" if row.get("peak_mib") is not None else "-"
        print(
            f"{name:<36} {row['provider']:<12} {row['prefill_ms']:>10.2f} {spread_text(row['prefill']):>6} "
            f"{row.get('prefill_vs_eager', 0):>7.2f}x {row['decode_tok_s']:>12.1f} {spread_text(row['decode']):>6} "
            f"{row['decode_vs_unpruned']:>7.2f}x {row['kv_cache_mib']:>8.2f} "
            f"{100 * row['kv_cache_share']:>7.1f}% {overhead:>9} {peak:>9}"
        )


def train_cases(device: str, smoke: bool) -> list[E2ECase]:
    if device == "cuda":
        return [
            E2ECase("qwen2_5_vl_7b_shapes", v, 1, torch.bfloat16, TEXT_TOKENS, 0)
            for v in (4096, 16384)[: 1 if smoke else None]
        ]
    return [E2ECase("small", v, 1, torch.float32, 64, 0) for v in (256, 1024)[: 1 if smoke else None]]


def sdpa_dense_soft_mask(q: Tensor, k: Tensor, v: Tensor, weight: Tensor, key_mask: Tensor, causal: bool) -> Tensor:
    """The peer: soft key weights as a dense additive log-weight mask [B, 1, S, S] in SDPA."""
    B, S = weight.shape
    if causal:  # causal, no padding keys, each row sees itself (rows with no key stay finite)
        allowed = attention_mask(key_mask, S)
    else:
        allowed = key_mask[:, None, None, :] | torch.eye(S, dtype=torch.bool, device=q.device)
    bias = torch.log(weight.to(q.dtype))[:, None, None, :].expand(B, 1, S, S).masked_fill(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)


def run_train_case(case: E2ECase, device: str, budget_s: float, progress: Progress) -> list[dict]:
    """Time one training step (forward + backward, LM tuned) per provider."""
    torch.manual_seed(0)
    config = case.config()
    model = _build_model(config, device, case.dtype)
    layers = (config.layers // 4, config.layers // 2)
    with torch.device(device):
        atp = ATPPruner(model, layers)
    images, ids, mask = make_prompt(case, device)
    answers = torch.zeros(case.batch, dtype=torch.long, device=device)
    params = [p for p in [*model.parameters(), *atp.parameters()] if p.requires_grad]

    def step(forward: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            for p in params:
                p.grad = None
            F.cross_entropy(forward(), answers).backward()

        return run

    steps = {
        "unmasked": step(lambda: model(images, ids, mask)),
        "atp_soft_mask": step(lambda: atp.soft_forward(model, images, ids, mask)[0]),
        "atp_sdpa_dense_mask": step(
            lambda: atp.soft_forward(model, images, ids, mask, soft_attention=sdpa_dense_soft_mask)[0]
        ),
    }
    base = {
        "case": {**case.as_dict(), "kind": "train_step", "atp_layers": list(layers)},
        "name": case.name().replace("e2e", "train"),
    }
    with torch.no_grad():
        ours = atp.soft_forward(model, images, ids, mask)[0]
        peer = atp.soft_forward(model, images, ids, mask, soft_attention=sdpa_dense_soft_mask)[0]
    diff = (ours.float() - peer.float()).abs().max().item()
    scale = ours.float().abs().max().item() + 1e-6
    note = f"max |logit diff| soft_mask_attention vs dense-mask SDPA {diff:.2e} (scale {scale:.2e})"
    rows = []
    for name, fn in steps.items():
        row = {**base, "provider": name, "check": note}
        if name in ("atp_soft_mask", "atp_sdpa_dense_mask") and diff > ATP_LOGIT_TOLERANCE[case.dtype] * scale:
            row["error"] = f"failed the correctness gate: {note}"
        else:
            try:
                row["peak_mib"] = peak_mib(fn, device)
                row["step"] = time_ms(fn, device, budget_s)
                row["step_ms"] = row["step"]["p50"]
            except torch.OutOfMemoryError as exc:
                row["error"] = f"out of memory: {str(exc)[:200]}"
        rows.append(row)
        progress.step(f"{base['name']} {name}")
    unmasked = next((r["step_ms"] for r in rows if r["provider"] == "unmasked" and "step_ms" in r), None)
    for row in rows:
        if unmasked and "step_ms" in row:
            row["step_vs_unmasked"] = row["step_ms"] / unmasked
    return rows


def print_train_table(rows: list[dict]) -> None:
    header = f"{'case':<36} {'provider':<20} {'step ms':>10} {'spread':>6} {'x unmasked':>11} {'peak MiB':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    last = None
    for row in rows:
        name = row["name"] if row["name"] != last else ""
        last = row["name"]
        if "step_ms" not in row:
            print(f"{name:<36} {row['provider']:<20} {row.get('error', 'skipped')[:80]}")
            continue
        peak = f"{row['peak_mib']:.0f}" if row.get("peak_mib") is not None else "-"
        print(
            f"{name:<36} {row['provider']:<20} {row['step_ms']:>10.2f} {spread_text(row['step']):>6} "
            f"{row['step_vs_unmasked']:>10.2f}x {peak:>9}"
        )
