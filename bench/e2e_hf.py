"""End-to-end speed of GlimpsePrune on an HF model (bench/run.py --e2e --hf [--model FAMILY]
[--attn-implementation NAME]: Qwen2.5-VL by default, or another family of ``hf_families.py``;
sdpa by default, or another attention implementation transformers can load here, e.g.
``flash_attention_2`` where flash-attn is installed, for the whole model).

Three providers on the same random-weight model:

* ``unpatched``: the stock model.
* ``glimpse_ops``: ``glimpse_ops.hf.apply_glimpse_prune`` (training-free glimpse, one
  ``glimpse_prune`` op, in-place cache compaction).
* ``eager_patch``: the same hooks with the selection and compaction written the eager
  public way: ``repeat_kv`` + matmul + softmax for the glimpse row, ``torch.topk`` + sort,
  per-layer per-sample ``index_select`` with host syncs (``peers.py``).

Per case: prefill latency, the time of layers 0..K (the forward stopped at layer K + 1;
for the patches it includes the pruning step), decode tokens/s from per-step times inside
``generate`` (``decode_step_ms``: generate's setup and the prefill are outside every step),
KV-cache bytes after prefill and (GPU) peak memory; each median with its p20 and p80, and no
compilation inside a timed loop (``timing.settle`` / ``RecompiledWhileTiming``). GPU: the
family's ~7B shapes in bf16, 4k and 16k visual tokens, 7.4% kept; CPU: a small model in fp32.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import peers
import torch
from hf_families import FAMILIES
from timing import no_compiles, peak_mib, quantiles, settle, spread_text, sync, time_ms

from glimpse_ops.glimpseprune import default_layer
from glimpse_ops.hf import SelectionInputs, apply_glimpse_prune, glimpse_prune_selection
from glimpse_ops.progress import Progress

KEEP_RATIO = 0.074
PROVIDERS = ("unpatched", "glimpse_ops", "eager_patch")


@dataclass(frozen=True)
class HFCase:
    family: str
    preset: str
    visual: int
    batch: int
    dtype: torch.dtype
    text: int
    decode_steps: int
    attention: str = "sdpa"  # the model's attn_implementation

    def name(self) -> str:
        size = f"{self.visual // 1024}k" if self.visual >= 1024 else str(self.visual)
        suffix = "" if self.attention == "sdpa" else f" {self.attention}"
        return f"hf {self.family} {self.preset} {size} B={self.batch}{suffix}"

    def as_dict(self) -> dict:
        return {
            "family": self.family,
            "preset": self.preset,
            "visual": self.visual,
            "batch": self.batch,
            "dtype": str(self.dtype).removeprefix("torch."),
            "text": self.text,
            "decode_steps": self.decode_steps,
            "keep_ratio": KEEP_RATIO,
            "attention": self.attention,
            "kind": "hf",
        }


def hf_cases(device: str, smoke: bool, family: str = "qwen2_5_vl", attention: str = "sdpa") -> list[HFCase]:
    if family not in FAMILIES:
        raise ValueError(f"bench --e2e --hf: unknown --model {family!r}; choose from {', '.join(FAMILIES)}")
    if device == "cuda":
        sizes = (4096, 16384)[: 1 if smoke else None]
        return [HFCase(family, "7b_shapes", v, 1, torch.bfloat16, 256, 32, attention) for v in sizes]
    sizes = (256, 1024)[: 1 if smoke else None]
    return [HFCase(family, "small", v, 1, torch.float32, 64, 16, attention) for v in sizes]


def build_model(case: HFCase, device: str):
    torch.manual_seed(0)
    with torch.device(device):
        model = FAMILIES[case.family].build(case.preset)
    model.config._attn_implementation = "sdpa"
    for sub in ("text_config", "vision_config"):
        getattr(model.config, sub)._attn_implementation = "sdpa"
    model = model.to(case.dtype).eval()
    if case.attention != "sdpa":  # after the cast: FlashAttention checks the dtype
        model.set_attn_implementation(case.attention)
    return model


def make_inputs(case: HFCase, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = FAMILIES[case.family].inputs(case.visual, case.batch, case.text, g, case.preset)
    return {k: v.to(device, case.dtype) if v.is_floating_point() else v.to(device) for k, v in x.items()}


def eager_selection(x: SelectionInputs):
    """The peer: the same hooks, with selection and compaction as the public code writes them."""
    probs = peers.eager_glimpse_scores(x.glimpse_q, x.keys[x.layer], x.valid, x.head_dim**-0.5)
    scores = probs.mean(dim=(1, 2))
    max_keep = int(x.max_keep.max())  # a host sync, as the public code has
    keep = peers.eager_select(scores, x.visual, max_keep)  # non-candidates (text, padding) are kept
    new_keys, new_values, index = peers.eager_compact(x.keys, x.values, keep)
    return new_keys, new_values, index, scores


class _Stop(Exception):
    pass


def _prefix_fn(model, inputs: dict, layer: int) -> Callable[[], None]:
    """The forward up to the entry of layer ``layer`` + 1 (layers 0..K, plus any pruning)."""
    layers = model.model.language_model.layers

    def stop(module, args, kwargs):
        raise _Stop

    def run() -> None:
        hook = layers[layer + 1].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            model(**inputs, use_cache=True, logits_to_keep=1)
        except _Stop:
            pass
        finally:
            hook.remove()

    return run


# max |logit diff| / max |logit| allowed between the two patches when they keep the same tokens:
# the compacted caches are then the same copies, so the logits are bitwise equal (measured 0 in
# fp32 on CPU); bf16 on a GPU is provisional
LOGIT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
# the share of kept positions that may differ in bf16, whose scores can order near-ties differently
BF16_INDEX_MISMATCH = 0.01


def _gate(model, inputs: dict, layer: int, dtype: torch.dtype) -> tuple[bool, str]:
    """Two greedy tokens with each patch: the kept positions must agree (exactly in fp32) and,
    where they agree, so must the logits of both steps (the prefill's from the kept hidden
    states, the decode step's from the compacted caches of layers 0..K). (ok, note)"""
    seen = {}
    for name, selection in (("glimpse_ops", glimpse_prune_selection), ("eager_patch", eager_selection)):
        handle = apply_glimpse_prune(model, layer=layer, threshold=None, max_keep_ratio=KEEP_RATIO, selection=selection)
        try:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)  # fmt: skip
            seen[name] = (handle.last_index, torch.stack(out.logits).float())
        finally:
            handle.remove()
    (ours_index, ours), (eager_index, eager) = seen["glimpse_ops"], seen["eager_patch"]
    same_shape = ours_index.shape == eager_index.shape
    mismatch = float((ours_index != eager_index).float().mean()) if same_shape else 1.0
    diff = (ours - eager).abs().max().item()
    scale = ours.abs().max().item() or 1.0
    note = (
        f"kept positions differing between the patches: {mismatch:.2%}; max |logit diff| {diff:.2e} (scale {scale:.2e})"
    )
    if mismatch > (0.0 if dtype == torch.float32 else BF16_INDEX_MISMATCH):
        return False, note
    if mismatch == 0.0 and diff > LOGIT_TOLERANCE[dtype] * scale:
        return False, note
    return True, note


def run_hf_case(case: HFCase, device: str, budget_s: float, progress: Progress) -> list[dict]:
    try:
        model = build_model(case, device)
    except (ImportError, ValueError) as exc:  # e.g. flash_attention_2 without flash-attn installed
        error = f"attn_implementation {case.attention!r} cannot be loaded here: {str(exc)[:300]}"
        progress.step(f"{case.name()}: {error}")
        return [{"case": case.as_dict(), "name": case.name(), "provider": p, "error": error} for p in PROVIDERS]
    inputs = make_inputs(case, device)
    n_layers = len(model.model.language_model.layers)
    layer = default_layer(n_layers)
    # the any-resolution families pack the tile grid nearest the case's count (hf_families.anyres_grid)
    visual_tokens = int((inputs["input_ids"][0] == FAMILIES[case.family].image_token_id).sum())
    label = case.name() + ("" if visual_tokens == case.visual else f" ({visual_tokens} visual tokens)")
    base = {"case": case.as_dict(), "name": label, "visual_tokens": visual_tokens}
    rows: list[dict] = []
    patches = dict(zip(PROVIDERS, (None, glimpse_prune_selection, eager_selection)))
    gate_ok, gate_note = _gate(model, inputs, layer, case.dtype)
    for name, selection in patches.items():
        row = {**base, "provider": name, "layer": layer}
        handle = (
            None
            if selection is None
            else apply_glimpse_prune(model, layer=layer, threshold=None, max_keep_ratio=KEEP_RATIO, selection=selection)
        )
        try:
            with torch.no_grad():
                prefill = lambda: model(**inputs, use_cache=True, logits_to_keep=1)  # noqa: E731
                out = prefill()
                if handle is not None:
                    row["check"] = gate_note
                    if not gate_ok:  # which of the two is wrong is unknown: both fail
                        row["error"] = f"failed the correctness gate: {gate_note}"
                if "error" not in row:
                    cache = out.past_key_values
                    row["kv_cache_bytes"] = sum(lay.keys.numel() * lay.keys.element_size() * 2 for lay in cache.layers)
                    del out, cache
                    row["peak_mib"] = peak_mib(prefill, device)
                    row["prefill"] = time_ms(prefill, device, budget_s)
                    row["prefill_ms"] = row["prefill"]["p50"]
                    row["layers_0_to_k"] = time_ms(_prefix_fn(model, inputs, layer), device, budget_s)
                    row["layers_0_to_k_ms"] = row["layers_0_to_k"]["p50"]
                    row["decode"] = _decode_rate(model, inputs, case, device)
                    row["decode_tok_s"] = row["decode"]["p50"]
                    if handle is None:  # the cross-check: a hand-written loop of single-token calls
                        direct = quantiles(direct_decode_step_ms(model, inputs, case.decode_steps, device))
                        row["decode_direct_tok_s"] = case.batch * 1e3 / direct["p50"]
                        row["decode_direct_step_ms"] = direct
        except torch.OutOfMemoryError as exc:
            row["error"] = f"out of memory: {str(exc)[:200]}"
        finally:
            if handle is not None:
                handle.remove()
        rows.append(row)
        progress.step(f"{label} {name}")
    first = rows[0] if "prefill_ms" in rows[0] else None
    eager = next((r for r in rows if r["provider"] == "eager_patch" and "prefill_ms" in r), None)
    for row in rows:
        if first and "prefill_ms" in row:
            row["prefill_vs_unpatched"] = first["prefill_ms"] / row["prefill_ms"]
            row["layers_0_to_k_vs_unpatched"] = row["layers_0_to_k_ms"] / first["layers_0_to_k_ms"]
            row["kv_cache_share"] = row["kv_cache_bytes"] / first["kv_cache_bytes"]
            row["decode_vs_unpatched"] = row["decode_tok_s"] / first["decode_tok_s"]
        if eager and "prefill_ms" in row:
            row["prefill_vs_eager_patch"] = eager["prefill_ms"] / row["prefill_ms"]
    return rows


def decode_step_ms(model, inputs: dict, steps: int, device: str, repeats: int = 3, clock=time.perf_counter) -> list:
    """Per-step decode times in ms from ``repeats`` greedy ``generate`` calls of ``steps`` tokens:
    a stopping criterion stamps the clock (after a device sync) each time a token is out, and
    the steps are the gaps between stamps after the first (the first token ends the prefill).
    generate's own setup and the prefill are therefore outside every step."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stamp(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            sync(device)
            self.times.append(clock())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def run() -> list[float]:
        stamp = Stamp()
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([stamp]))  # fmt: skip
        return [1e3 * (b - a) for a, b in zip(stamp.times[:-1], stamp.times[1:])]

    settle(run, "generate")
    with no_compiles("while timing decode steps"):
        return [gap for _ in range(repeats) for gap in run()]


def direct_decode_step_ms(model, inputs: dict, steps: int, device: str, repeats: int = 3) -> list:
    """Per-step times in ms of a hand-written decode loop on the stock model: one prefill, then
    single-token forward calls on its cache, each synchronized and timed alone (the cross-check
    of ``decode_step_ms`` on the unpatched model)."""
    gaps: list[float] = []
    length = inputs["input_ids"].shape[1]
    rope = getattr(model.config.get_text_config(), "rope_parameters", None) or {}
    rope_axes = (3,) if "mrope_section" in rope else ()
    with torch.no_grad():
        for round_index in range(repeats + 1):  # round 0 warms up
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            cache, token, mask = out.past_key_values, out.logits[:, -1:].argmax(-1), inputs["attention_mask"]
            round_gaps = []
            for i in range(steps - 1):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = torch.tensor([length + i], device=token.device)
                # the timing needs the shapes, not the exact M-RoPE values: every axis at S + i
                ids = position.expand(*rope_axes, token.shape[0], 1)
                sync(device)
                begin = time.perf_counter()
                out = model(input_ids=token, attention_mask=mask, past_key_values=cache, cache_position=position,
                            position_ids=ids, use_cache=True)  # fmt: skip
                token = out.logits[:, -1:].argmax(-1)
                sync(device)
                round_gaps.append(1e3 * (time.perf_counter() - begin))
            gaps += round_gaps if round_index else []
    return gaps


def _decode_rate(model, inputs: dict, case: HFCase, device: str) -> dict[str, float]:
    """Decode tokens/s from the per-step times: p50 (and p20/p80 of the rate) over all steps."""
    steps = quantiles(decode_step_ms(model, inputs, case.decode_steps, device))
    rate = {q: case.batch * 1e3 / steps[other] for q, other in (("p20", "p80"), ("p50", "p50"), ("p80", "p20"))}
    return {**rate, "step_ms": steps}


def print_hf_table(rows: list[dict]) -> None:
    """One line per provider; each median has its p20-p80 spread as a share of it beside it,
    flagged with '!' above 20% (see timing.spread_text)."""
    header = (
        f"{'case':<34} {'provider':<12} {'prefill ms':>10} {'spread':>6} {'vs eager':>8} {'vs stock':>8} "
        f"{'0..K ms':>9} {'spread':>6} {'0..K x':>7} "
        f"{'decode tok/s':>12} {'spread':>6} {'KV share':>8} {'peak MiB':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    last = None
    for row in rows:
        name = row["name"] if row["name"] != last else ""
        last = row["name"]
        if "prefill_ms" not in row:
            print(f"{name:<34} {row['provider']:<12} {row.get('error', 'skipped')[:80]}")
            continue
        peak = f"{row['peak_mib']:.0f}" if row.get("peak_mib") is not None else "-"
        print(
            f"{name:<34} {row['provider']:<12} {row['prefill_ms']:>10.2f} {spread_text(row['prefill']):>6} "
            f"{row.get('prefill_vs_eager_patch', 0):>7.2f}x {row.get('prefill_vs_unpatched', 0):>7.2f}x "
            f"{row['layers_0_to_k_ms']:>9.2f} {spread_text(row['layers_0_to_k']):>6} "
            f"{row.get('layers_0_to_k_vs_unpatched', 0):>6.2f}x "
            f"{row['decode_tok_s']:>12.1f} {spread_text(row['decode']):>6} "
            f"{100 * row.get('kv_cache_share', 0):>7.1f}% {peak:>9}"
        )
    for row in rows:
        if "decode_direct_step_ms" in row:
            g, d = row["decode"]["step_ms"], row["decode_direct_step_ms"]
            agree = "overlap" if g["p20"] <= d["p80"] and d["p20"] <= g["p80"] else "DO NOT OVERLAP"
            print(
                f"decode cross-check, {row['name']} unpatched: ms per step inside generate {g['p50']:.1f} "
                f"(p20-p80 {g['p20']:.1f}-{g['p80']:.1f}), hand-written forward loop {d['p50']:.1f} "
                f"({d['p20']:.1f}-{d['p80']:.1f}): the spreads {agree} (generate adds its per-token work: "
                "logits processors, stopping checks, input preparation)"
            )
