"""End-to-end speed of GlimpsePrune on an HF model (bench/run.py --e2e --hf [--model FAMILY]:
Qwen2.5-VL by default, or another family of ``hf_families.py``).

Three providers on the same random-weight model:

* ``unpatched``: the stock model.
* ``glimpse_ops``: ``glimpse_ops.hf.apply_glimpse_prune`` (training-free glimpse, one
  ``glimpse_prune`` op, in-place cache compaction).
* ``eager_patch``: the same hooks with the selection and compaction written the eager
  public way: ``repeat_kv`` + matmul + softmax for the glimpse row, ``torch.topk`` + sort,
  per-layer per-sample ``index_select`` with host syncs (``peers.py``).

Per case: prefill latency, the time of layers 0..K (the forward stopped at layer K + 1;
for the patches it includes the pruning step), decode tokens/s, KV-cache bytes after
prefill and (GPU) peak memory. GPU: Qwen2.5-VL-7B shapes in bf16, 4k and 16k visual
tokens, 7.4% kept; CPU: a small Qwen2.5-VL in fp32.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import peers
import torch
from hf_families import FAMILIES
from timing import peak_mib, sync, time_ms

from glimpse_ops.hf import SelectionInputs, apply_glimpse_prune, glimpse_prune_selection
from glimpse_ops.progress import Progress

KEEP_RATIO = 0.074


@dataclass(frozen=True)
class HFCase:
    family: str
    preset: str
    visual: int
    batch: int
    dtype: torch.dtype
    text: int
    decode_steps: int

    def name(self) -> str:
        size = f"{self.visual // 1024}k" if self.visual >= 1024 else str(self.visual)
        return f"hf {self.family} {self.preset} {size} B={self.batch}"

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
            "kind": "hf",
        }


def hf_cases(device: str, smoke: bool, family: str = "qwen2_5_vl") -> list[HFCase]:
    if family not in FAMILIES:
        raise ValueError(f"bench --e2e --hf: unknown --model {family!r}; choose from {', '.join(FAMILIES)}")
    if device == "cuda":
        sizes = (4096, 16384)[: 1 if smoke else None]
        return [HFCase(family, "7b_shapes", v, 1, torch.bfloat16, 256, 32) for v in sizes]
    return [HFCase(family, "small", v, 1, torch.float32, 64, 8) for v in (256, 1024)[: 1 if smoke else None]]


def build_model(case: HFCase, device: str):
    torch.manual_seed(0)
    with torch.device(device):
        model = FAMILIES[case.family].build(case.preset)
    model.config._attn_implementation = "sdpa"
    for sub in ("text_config", "vision_config"):
        getattr(model.config, sub)._attn_implementation = "sdpa"
    return model.to(case.dtype).eval()


def make_inputs(case: HFCase, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x = FAMILIES[case.family].inputs(case.visual, case.batch, case.text, g)
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


def run_hf_case(case: HFCase, device: str, budget_s: float, progress: Progress) -> list[dict]:
    model = build_model(case, device)
    inputs = make_inputs(case, device)
    n_layers = len(model.model.language_model.layers)
    layer = max(0, math.ceil(2 * n_layers / 3) - 1)
    base = {"case": case.as_dict(), "name": case.name()}
    rows: list[dict] = []
    patches = {"unpatched": None, "glimpse_ops": glimpse_prune_selection, "eager_patch": eager_selection}
    reference: dict = {}
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
                    reference.setdefault("index", handle.last_index)
                    reference.setdefault("logits", out.logits[:, -1])
                    index = handle.last_index
                    same_shape = index.shape == reference["index"].shape
                    mismatch = float((index != reference["index"]).float().mean()) if same_shape else 1.0
                    diff = (reference["logits"].float() - out.logits[:, -1].float()).abs().max().item()
                    row["check"] = (
                        f"kept positions differing from glimpse_ops: {mismatch:.2%}; max |logit diff| {diff:.2e}"
                    )
                    # bf16 scores may order near-ties differently; more than 1% is a bug
                    if mismatch > (0.0 if case.dtype == torch.float32 else 0.01):
                        row["error"] = f"failed the correctness gate: {row['check']}"
                if "error" not in row:
                    cache = out.past_key_values
                    row["kv_cache_bytes"] = sum(lay.keys.numel() * lay.keys.element_size() * 2 for lay in cache.layers)
                    del out, cache
                    row["peak_mib"] = peak_mib(prefill, device)
                    row["prefill_ms"] = time_ms(prefill, device, budget_s)["p50"]
                    row["layers_0_to_k_ms"] = time_ms(_prefix_fn(model, inputs, layer), device, budget_s)["p50"]
                    row["decode_tok_s"] = _decode_rate(model, inputs, case, row["prefill_ms"], device)
        except torch.OutOfMemoryError as exc:
            row["error"] = f"out of memory: {str(exc)[:200]}"
        finally:
            if handle is not None:
                handle.remove()
        rows.append(row)
        progress.step(f"{case.name()} {name}")
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


def _decode_rate(model, inputs: dict, case: HFCase, prefill_ms: float, device: str) -> float:
    """Decode tokens/s: (generate time - prefill time) over the tokens after the first."""
    times = []
    for _ in range(3):
        sync(device)
        begin = time.perf_counter()
        model.generate(**inputs, max_new_tokens=case.decode_steps, min_new_tokens=case.decode_steps, do_sample=False)
        sync(device)
        times.append(time.perf_counter() - begin)
    decode_s = max(statistics.median(times) - prefill_ms * 1e-3, 1e-9)
    return case.batch * (case.decode_steps - 1) / decode_s


def print_hf_table(rows: list[dict]) -> None:
    header = (
        f"{'case':<34} {'provider':<12} {'prefill ms':>10} {'vs eager':>8} {'vs stock':>8} "
        f"{'0..K ms':>9} {'0..K x':>7} "
        f"{'decode tok/s':>12} {'KV share':>8} {'peak MiB':>9}"
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
            f"{name:<34} {row['provider']:<12} {row['prefill_ms']:>10.2f} "
            f"{row.get('prefill_vs_eager_patch', 0):>7.2f}x {row.get('prefill_vs_unpatched', 0):>7.2f}x "
            f"{row['layers_0_to_k_ms']:>9.2f} {row.get('layers_0_to_k_vs_unpatched', 0):>6.2f}x "
            f"{row['decode_tok_s']:>12.1f} {100 * row.get('kv_cache_share', 0):>7.1f}% {peak:>9}"
        )
