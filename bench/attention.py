"""soft_mask_attention benchmark: forward and forward+backward against the attention peers.

Peers, side by side: SDPA with no mask (the fastest backend; the ceiling: the soft mask
should cost almost nothing over it), SDPA's memory-efficient backend with a materialized
additive log-weight mask that requires grad (its mask gradient is dense), FlexAttention
with a score_mod that adds a captured log-weight requiring grad (GPU only), eager PyTorch,
and ours (``triton``; ``reference`` only at gate size). Each provider is first checked
against the reference at N=256; timings then run at the case's size. Peak extra memory is
reported on GPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timing import gate_failed, measure, peak_mib, record_error

import glimpse_ops as g
from glimpse_ops.reference import soft_mask_attention_reference

HEADS, KV_HEADS, HEAD_DIM = 28, 4, 128
GATE_N = 256


@dataclass(frozen=True)
class AttentionCase:
    n: int
    batch: int
    mode: str  # "fwd" or "fwd+bwd"
    dtype: str = "bf16"
    op: str = "soft_mask_attention"

    def name(self) -> str:
        return f"soft_mask_attention N={self.n} B={self.batch} {self.mode}"

    def flops(self) -> float:
        """FlashAttention's convention: 4 N^2 D H forward, halved when causal; bwd 2.5x."""
        fwd = 4 * self.n * self.n * HEAD_DIM * HEADS * self.batch / 2
        return fwd * (3.5 if self.mode == "fwd+bwd" else 1.0)

    def input_bytes(self) -> int:
        return 2 * self.batch * (HEADS + 2 * KV_HEADS) * self.n * HEAD_DIM * (3 if self.mode == "fwd+bwd" else 1)

    def as_dict(self) -> dict:
        return asdict(self)


def attention_cases(smoke: bool, device: str) -> list[AttentionCase]:
    if device != "cuda":  # fp32, where CPU SDPA is fastest; 2k only outside --smoke (dense peers take seconds)
        sizes = (512,) if smoke else (512, 2048)
        return [AttentionCase(n, 1, mode, "fp32") for n in sizes for mode in ("fwd", "fwd+bwd")]
    sizes = (1024, 4096) if smoke else (1024, 4096, 8192, 16384)
    batches = (1,) if smoke else (1, 4)
    return [AttentionCase(n, b, mode) for n in sizes for b in batches for mode in ("fwd", "fwd+bwd")]


def make_attention_inputs(n: int, batch: int, dtype: torch.dtype, device: str) -> dict:
    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    w = torch.rand(batch, n, device=device) * 0.9 + 0.1  # > 0: the peers take log w
    return {
        "q": randn(batch, HEADS, n, HEAD_DIM),
        "k": randn(batch, KV_HEADS, n, HEAD_DIM),
        "v": randn(batch, KV_HEADS, n, HEAD_DIM),
        "w": w.to(dtype),
    }


def _repeat(t: torch.Tensor) -> torch.Tensor:
    return t.repeat_interleave(HEADS // KV_HEADS, dim=1)


def _causal_log_weight(w: torch.Tensor, n: int) -> torch.Tensor:
    """[B, 1, N, N] additive mask: log w_j on allowed keys, -inf above the diagonal."""
    causal = torch.full((n, n), float("-inf"), device=w.device, dtype=w.dtype).triu(1)
    return torch.log(w)[:, None, None, :] + causal


def attention_providers(device: str, n: int) -> dict[str, Callable[[dict], torch.Tensor]]:
    scale = 1.0 / math.sqrt(HEAD_DIM)

    def sdpa_unmasked(x):
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True, scale=scale, enable_gqa=True)

    def sdpa_dense_mask(backends: list | None):
        """None: the backend SDPA picks for these inputs."""

        def run(x):
            mask = _causal_log_weight(x["w"], x["q"].shape[2])
            with contextlib.nullcontext() if backends is None else torch.nn.attention.sdpa_kernel(backends):
                return F.scaled_dot_product_attention(
                    x["q"], _repeat(x["k"]), _repeat(x["v"]), attn_mask=mask, scale=scale
                )

        return run

    def eager(x):
        s = x["q"] @ _repeat(x["k"]).transpose(-1, -2) * scale + _causal_log_weight(x["w"], x["q"].shape[2])
        return torch.softmax(s.float(), dim=-1).to(x["q"].dtype) @ _repeat(x["v"])

    providers = {"sdpa_unmasked": sdpa_unmasked}
    backend = torch.nn.attention.SDPBackend
    if device == "cuda":
        providers["sdpa_efficient_mask"] = sdpa_dense_mask([backend.EFFICIENT_ATTENTION])
    else:
        providers["sdpa_dense_mask"] = sdpa_dense_mask(None)
        providers["sdpa_math_mask"] = sdpa_dense_mask([backend.MATH])
    providers["eager"] = eager
    if device == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def flex_step(q, k, v, w, block_mask):
            log_w = torch.log(w).float()

            def add_log_weight(score, b, h, q_idx, kv_idx):
                return score + log_w[b, kv_idx]

            return flex_attention(
                q, k, v, score_mod=add_log_weight, block_mask=block_mask, scale=scale, enable_gqa=True
            )

        compiled = torch.compile(flex_step, dynamic=False)
        masks: dict[int, object] = {}

        def flex_captured(x):
            size = x["q"].shape[2]
            if size not in masks:
                masks[size] = create_block_mask(
                    lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, size, size, device=device
                )
            return compiled(x["q"], x["k"], x["v"], x["w"], masks[size])

        providers["flex_captured_weight"] = flex_captured
    ours = "triton" if device == "cuda" else "native"
    if ours in g.available_backends("soft_mask_attention", device):
        providers[ours] = lambda x: g.soft_mask_attention(
            x["q"], x["k"], x["v"], x["w"], None, causal=True, scale=scale, backend=ours
        )
    if n <= 1024:
        providers["reference"] = lambda x: g.soft_mask_attention(
            x["q"], x["k"], x["v"], x["w"], None, causal=True, scale=scale, backend="reference"
        )
    return providers


def gate(name: str, fn: Callable[[dict], torch.Tensor], dtype: torch.dtype, device: str) -> tuple[bool, str]:
    """Forward and every gradient against the fp32 reference at N = GATE_N. The unmasked
    ceiling is checked with w = 1 (what it computes), without a weight gradient."""
    x = make_attention_inputs(GATE_N, 1, dtype, device)
    unweighted = name == "sdpa_unmasked"
    if unweighted:
        x["w"] = torch.ones_like(x["w"])
    x = {k: t.clone().requires_grad_(True) for k, t in x.items()}
    grad = torch.randn_like(x["q"])
    out = fn(x)
    got = torch.autograd.grad(out, [x["q"], x["k"], x["v"], x["w"]], grad, allow_unused=True)
    ref_inputs = [t.detach().float().requires_grad_(True) for t in (x["q"], x["k"], x["v"], x["w"])]
    ref = soft_mask_attention_reference(*ref_inputs, None, True, 1.0 / math.sqrt(HEAD_DIM))
    want = torch.autograd.grad(ref, ref_inputs, grad.float())
    tol = 1e-3 if dtype == torch.float32 else 6e-2
    errors = []
    labels = ("out", "dq", "dk", "dv") if unweighted else ("out", "dq", "dk", "dv", "dw")
    for label, a, b in zip(labels, (out, *got), (ref, *want)):
        if a is None:
            return False, f"{label} has no gradient"
        err = (a.float() - b).abs().max().item() / (b.abs().max().item() or 1.0)
        errors.append(f"{label} {err:.1e}")
        if err > tol:
            return False, "rel err " + ", ".join(errors)
    return True, "rel err " + ", ".join(errors)


def run_attention_case(case: AttentionCase, device: str, budget_s: float, progress, gates: dict) -> list[dict]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
    x = make_attention_inputs(case.n, case.batch, dtype, device)
    if case.mode == "fwd+bwd":
        x = {k: t.requires_grad_(True) for k, t in x.items()}
    rows = []
    for name, fn in attention_providers(device, case.n).items():
        row = {"case": case.as_dict(), "name": case.name(), "provider": name}
        try:
            if (name, case.dtype) not in gates:
                gates[(name, case.dtype)] = gate(name, fn, dtype, device)
            ok, note = gates[(name, case.dtype)]
            row["check"] = note
            if not ok:
                gate_failed(row, note, progress)
                rows.append(row)
                continue
            grad = torch.randn_like(x["q"])

            def step(fn=fn, grad=grad):
                if case.mode == "fwd":
                    return fn(x)
                return torch.autograd.grad(fn(x), [x["q"], x["k"], x["v"], x["w"]], grad, allow_unused=True)

            with torch.no_grad() if case.mode == "fwd" else torch.enable_grad():
                row.update(measure(step, device, budget_s))
                if device != "cuda":  # measure() reports the GPU's peak itself
                    row["peak_extra_mib"] = peak_mib(step, device)
            row["tflops"] = case.flops() / (row["p50"] * 1e-3) / 1e12
        except Exception as exc:  # e.g. out of memory for the dense-mask peers at 16k
            record_error(row, exc)
        rows.append(row)
        progress.step(f"{case.name()} {name}")
    unmasked = next((r["p50"] for r in rows if r["provider"] == "sdpa_unmasked" and "p50" in r), None)
    for row in rows:
        if unmasked and "p50" in row:
            row["time_vs_sdpa_unmasked"] = row["p50"] / unmasked
    return rows
