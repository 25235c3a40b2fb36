"""Peak memory of a pruning prefill step against the stock step (bench/run.py --vllm --memory):
stock vLLM and the glimpse_ops.vllm plugin on the same engine settings, one request of 16,384
visual tokens, on a random checkpoint with Qwen2.5-VL-7B's text widths (hidden 3584, 28 query
and 4 KV heads of 128, MLP 18944) and two decoder layers, the prune after layer 0 (the
plugin's capture is then one layer's q, k and v: what CPU_ATTN holds per layer 0..K, and more
than TRITON_ATTN's layer-K q and k). fp32, vLLM's CPU engine (CPU_ATTN). Needs vLLM (on a CPU
machine: tests/vllm_plugin/make_venv.sh).

What is measured: the process heap's peak above its level before the call (glibc's
``mallinfo2``: bytes in malloc'd chunks plus mmap'd blocks, polled every 0.2 ms by a thread)
while the engine runs the request's prefill and first token, after a small warm-up request
(one-time set-up). That covers everything the step allocates (the ViT, the decoder's activations,
the plugin's capture and its scoring), not the weights or the KV pool, which exist before.
The model also reports the bytes its capture held at the prune (``capture_bytes``). Gate: the
plugin's response reports the kept counts its keep rule gives.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its heap is ours
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

LAYERS, PRUNE_LAYER = 2, 0


@dataclass(frozen=True)
class MemoryCase:
    side: int  # image side in pixels (square): (side / 4)^2 visual tokens
    widths: str  # "7b" (Qwen2.5-VL-7B's text widths) or "tiny"

    @property
    def visual(self) -> int:
        return (self.side // 4) ** 2

    def name(self) -> str:
        return f"vllm qwen2_5_vl {self.widths}-widths {LAYERS} layers {self.visual} visual prefill"


def memory_cases(smoke: bool) -> tuple[list[MemoryCase], list[float]]:
    """(cases, keep ratios): 16,384 visual tokens at the 7B widths (smoke: 256 at tiny widths)."""
    return ([MemoryCase(64, "tiny")] if smoke else [MemoryCase(512, "7b")]), [0.1]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


class HeapPeak:
    """``with HeapPeak() as peak: ...`` then ``peak.bytes``: the heap's highest level during the
    block above its level at the start (glibc only)."""

    def __init__(self, interval_s: float = 2e-4) -> None:
        self._libc = ctypes.CDLL("libc.so.6")
        self._libc.mallinfo2.restype = _Mallinfo2
        self.interval_s, self.bytes = interval_s, 0

    def _used(self) -> int:
        info = self._libc.mallinfo2()
        return info.hblkhd + info.uordblks

    def __enter__(self) -> HeapPeak:
        self._base, self._top, self._stop = self._used(), 0, False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop:
            self._top = max(self._top, self._used())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        self.bytes = max(0, max(self._top, self._used()) - self._base)


class _MemoryBench:
    def __init__(self) -> None:
        from transformers import AutoTokenizer

        from glimpse_ops.vllm import testing

        self.testing, self.folders, self.engines = testing, {}, {}
        self.tokenizers = {}
        self.AutoTokenizer = AutoTokenizer

    def folder(self, widths: str):
        if widths not in self.folders:
            geometry = self.testing.QWEN2_5_VL_7B_TEXT if widths == "7b" else {}
            self.folders[widths] = self.testing.write_tiny_qwen2_5_vl(
                tempfile.mkdtemp(prefix=f"glimpse-vllm-memory-{widths}-"), seed=5, layers=LAYERS,
                text_geometry={**geometry, "max_position_embeddings": 32768}, max_pixels=1024 * 1024,
            )  # fmt: skip
            self.tokenizers[widths] = self.AutoTokenizer.from_pretrained(self.folders[widths])
        return self.folders[widths]

    def engine(self, case: MemoryCase, ratio: float | None):
        import vllm

        import glimpse_ops.vllm as glimpse_vllm

        key = (case, ratio)
        if key not in self.engines:
            settings = dict(enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False)
            if ratio is not None:
                glimpse_vllm.register()
                settings = glimpse_vllm.engine_kwargs(layer=PRUNE_LAYER, max_keep_ratio=ratio)
            tokens = case.visual + 64
            self.engines[key] = vllm.LLM(
                model=str(self.folder(case.widths)), dtype="float32", max_model_len=tokens, seed=0, block_size=32,
                max_num_batched_tokens=tokens, limit_mm_per_prompt={"image": 1, "video": 0}, **settings,
            )  # fmt: skip
        return self.engines[key]

    def prompt(self, case: MemoryCase, side: int, seed: int) -> dict:
        text = self.testing.chat_prompt(self.tokenizers[case.widths], "What is in the picture?", with_image=True)
        return {"prompt": text, "multi_modal_data": {"image": self.testing.random_image(side, side, seed)}}


def _model(engine):
    return engine.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.get_model()


def _measure(bench: _MemoryBench, case: MemoryCase, ratio: float | None) -> dict:
    import vllm

    engine = bench.engine(case, ratio)
    one = vllm.SamplingParams(max_tokens=1, temperature=0.0)
    row = {"provider": "stock" if ratio is None else "glimpse_ops", "keep_ratio": ratio}
    print(f"  {row['provider']}: warm-up request", file=sys.stderr, flush=True)
    engine.generate([bench.prompt(case, 64, 1)], one, use_tqdm=False)  # small: one-time set-up only
    print(f"  {row['provider']}: the measured request ({case.visual} visual tokens)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with HeapPeak() as peak:
        (output,) = engine.generate([bench.prompt(case, case.side, 0)], one, use_tqdm=False)
    row |= {"peak_step_mib": peak.bytes / 2**20, "step_s": time.perf_counter() - start,
            "prompt_tokens": len(output.prompt_token_ids)}  # fmt: skip
    if ratio is None:
        return row
    report = (output.kv_transfer_params or {}).get("glimpse")
    want = math.ceil(ratio * case.visual)
    if report is None or report["kept_visual_tokens"] != want:
        return row | {"error": f"failed the gate: the response reports {report}, the rule keeps {want} visual tokens"}
    return row | {"kept_prompt_tokens": report["kept_prompt_tokens"],
                  "capture_mib": _model(engine).capture_bytes / 2**20}  # fmt: skip


def run_memory_case(bench: _MemoryBench, case: MemoryCase, ratios: list[float], progress) -> list[dict]:
    from serving import rows_per_engine

    base = {"name": case.name(), "visual": case.visual, "kind": "vllm-memory", "layers": LAYERS,
            "prune_layer": PRUNE_LAYER, "dtype": "float32", "backend": "CPU_ATTN"}  # fmt: skip
    rows = rows_per_engine(base, ratios, lambda ratio: _measure(bench, case, ratio), progress)
    stock = rows[0]
    for row in rows[1:]:
        if "peak_step_mib" in row and "peak_step_mib" in stock:
            row["peak_vs_stock"] = row["peak_step_mib"] / stock["peak_step_mib"]
    return rows


def print_memory_table(rows: list[dict]) -> None:
    header = f"{'case':<58} {'provider':<12} {'keep':>5} {'peak MiB':>9} {'x stock':>8} {'capture MiB':>11} {'s':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        keep = f"{row['keep_ratio']:.2f}" if row.get("keep_ratio") else "-"
        if "peak_step_mib" not in row or "error" in row:
            print(f"{row['name']:<58} {row['provider']:<12} {keep:>5} {row.get('error', '')[:90]}")
            continue
        capture = f"{row['capture_mib']:.1f}" if "capture_mib" in row else "-"
        print(f"{row['name']:<58} {row['provider']:<12} {keep:>5} {row['peak_step_mib']:>9.1f} "
              f"{row.get('peak_vs_stock', 1.0):>7.2f}x {capture:>11} {row['step_s']:>6.1f}")  # fmt: skip


def make_memory_bench() -> _MemoryBench:
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            "bench/run.py --vllm --memory needs vLLM 0.32 (on a CPU machine: bash tests/vllm_plugin/make_venv.sh "
            f"VENV, then VENV/bin/python bench/run.py --vllm --memory): {error}"
        ) from error
    return _MemoryBench()
