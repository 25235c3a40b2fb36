"""Benchmark cases in Qwen2.5-VL-7B geometry: H=28, Hkv=4, D=128, 28 layers, scoring layer
K=18 so layers 0..18 (19) are compacted; 1k/4k/16k visual tokens plus 256 text tokens."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

HEADS, KV_HEADS, HEAD_DIM, LAYERS, SCORE_LAYER = 28, 4, 128, 28, 18
COMPACTED_LAYERS = SCORE_LAYER + 1
TEXT_TOKENS = 256
VISUAL_TOKENS = (1024, 4096, 16384)
KEEP_RATIOS = (0.05, 0.074, 0.10, 0.25, 0.50)
BATCHES = (1, 8)
OPS = ("glimpse_scores", "select_index", "compact_kv", "compact_kv_paged", "prune_kv", "glimpse_prune")
PAGE = 16  # tokens per block of the paged cache (vLLM's default block size)


@dataclass(frozen=True)
class Case:
    op: str
    visual: int
    keep_ratio: float
    batch: int
    dtype: str = "bf16"

    @property
    def seq(self) -> int:
        return self.visual + TEXT_TOKENS

    @property
    def max_keep(self) -> int:
        return max(1, math.ceil(self.keep_ratio * self.visual))

    @property
    def max_len(self) -> int:
        return TEXT_TOKENS + self.max_keep

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    def name(self) -> str:
        keep = "" if self.op == "glimpse_scores" else f" keep={self.keep_ratio:.1%}"
        return f"{self.op} Nv={self.visual // 1024}k B={self.batch}{keep}"

    def input_bytes(self) -> int:
        """Bytes of the inputs the case allocates (to skip what does not fit)."""
        elem = torch.finfo(self.torch_dtype).bits // 8
        layer = self.batch * KV_HEADS * self.seq * HEAD_DIM * elem
        if self.op == "glimpse_scores":
            return layer
        if self.op == "select_index":
            return self.batch * self.seq * 5
        return 2 * COMPACTED_LAYERS * layer

    def moved_bytes(self) -> int:
        """Bytes a perfect kernel must read and write (for GB/s and % of copy bandwidth)."""
        elem = torch.finfo(self.torch_dtype).bits // 8
        row = KV_HEADS * HEAD_DIM * elem
        if self.op == "glimpse_scores":
            return self.batch * (self.seq * row + HEADS * self.seq * 4)
        if self.op == "select_index":
            return self.batch * (self.seq * 5 + self.max_len * 8)
        compact = 2 * 2 * COMPACTED_LAYERS * self.batch * self.max_len * row  # read + write
        if self.op == "glimpse_prune":
            compact += self.batch * self.seq * row
        return compact

    def as_dict(self) -> dict:
        return {**asdict(self), "seq": self.seq, "max_keep": self.max_keep, "layers_compacted": COMPACTED_LAYERS}


# The default CPU run: a representative subset that takes a few minutes on 2 cores.
CPU_DEFAULT = ((4096, 1), (4096, 8), (16384, 1))
HEADLINE_KEEP = 0.074


def all_cases(smoke: bool, full: bool = True) -> list[Case]:
    """--smoke: 4k, B=1, 10% kept. full: every size, batch and keep ratio. Otherwise (the CPU
    default) 4k at B = 1 and 8 and 16k at B = 1, 7.4% kept."""
    if smoke:
        return [Case(op, 4096, 0.10, 1) for op in OPS]
    if not full:
        return [Case(op, visual, HEADLINE_KEEP, batch) for op in OPS for visual, batch in CPU_DEFAULT]
    cases = []
    for op in OPS:
        for visual in VISUAL_TOKENS:
            for batch in BATCHES:
                ratios = (KEEP_RATIOS[0],) if op == "glimpse_scores" else KEEP_RATIOS
                cases += [Case(op, visual, ratio, batch) for ratio in ratios]
    return cases


def make_inputs(case: Case, device: str) -> dict:
    """Fresh random inputs: a visual span after 64 prefix text tokens, left padding on odd
    rows of a batch so that rows differ."""
    g = torch.Generator(device="cpu").manual_seed(hash(case) % 2**31)
    dtype, B, S = case.torch_dtype, case.batch, case.seq
    shape = (B, KV_HEADS, S, HEAD_DIM)
    layers = COMPACTED_LAYERS if case.op in ("compact_kv", "prune_kv", "glimpse_prune") else 1
    if case.op == "compact_kv_paged":
        return paged_inputs(case, device, g)

    def randn(*size):
        return torch.randn(*size, generator=g).to(dtype=dtype).to(device)

    inputs = {"scale": 1.0 / math.sqrt(HEAD_DIM)}
    key_mask = torch.ones(B, S, dtype=torch.bool)
    for b in range(1, B, 2):
        key_mask[b, : 8 * b] = False
    candidates = torch.zeros(B, S, dtype=torch.bool)
    candidates[:, 64 : 64 + case.visual] = True
    inputs["key_mask"] = key_mask.to(device)
    inputs["candidates"] = (candidates & key_mask).to(device)
    inputs["q"] = randn(B, HEADS, 1, HEAD_DIM)
    if case.op == "select_index":
        inputs["scores"] = torch.rand(B, S, generator=g).to(device)
        return inputs
    inputs["keys"] = [randn(*shape) for _ in range(layers)]
    if case.op == "glimpse_scores":
        return inputs
    inputs["values"] = [randn(*shape) for _ in range(layers)]
    inputs["scores"] = torch.rand(B, S, generator=g).to(device)
    return inputs


def paged_inputs(case: Case, device: str, g: torch.Generator) -> dict:
    """compact_kv_paged: the caches of layers 0..K in vLLM's default layout (per layer
    [num_blocks, Hkv, PAGE, 2 * D], K and V side by side), each request's prompt on its own
    shuffled blocks, and its kept positions (the text and the top ``max_keep`` visual tokens
    of random scores, ascending)."""
    B, S = case.batch, case.seq
    per_request = math.ceil(S / PAGE)
    blocks = B * per_request
    caches = [
        torch.randn(blocks, KV_HEADS, PAGE, 2 * HEAD_DIM, generator=g).to(dtype=case.torch_dtype).to(device)
        for _ in range(COMPACTED_LAYERS)
    ]
    table = torch.randperm(blocks, generator=g).view(B, per_request).int()
    scores = torch.rand(B, S, generator=g)
    visual = scores[:, 64 : 64 + case.visual]
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[:, 64 : 64 + case.visual] = False
    top = visual.topk(case.max_keep, dim=1).indices + 64
    keep.scatter_(1, top, True)
    index = torch.stack([row.nonzero().squeeze(1) for row in keep])  # [B, max_len] ascending
    return {"caches": caches, "table": table.to(device), "index": index.to(device)}
