"""Serving benchmark (bench/run.py --vllm): stock vLLM against the glimpse_ops.vllm plugin on the
same engine settings (eager, no prefix caching, no chunked prefill, block size 32, a fixed
number of KV blocks), on the tiny Qwen2.5-VL checkpoint of glimpse_ops.vllm.testing (fp32)
written to a temporary folder. Needs vLLM (on a CPU machine: tests/vllm_plugin/make_venv.sh).

Per image size (visual tokens per request) and keep ratio, for each engine:

* correctness gate: the first request's greedy tokens equal glimpse_ops.hf's on the same
  checkpoint (stock: the stock HF model's; plugin: ``hf.pruned`` at the same ratio);
* requests/s and output tokens/s for a batch of requests (all submitted at once), and the
  time to first token of one request alone (median of 5, with its p20-p80 spread);
* KV blocks held by one request after its prefill (measured from the scheduler's block pool)
  and the peak of blocks in use while the batch runs;
* concurrent requests that fit in the engine's KV cache: its blocks divided by the blocks one
  request holds once it has generated its tokens (derived from the measured blocks held).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from timing import quantiles, record_error, spread_text

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler's block pool is read in-process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

BLOCK, POOL, OUTPUT_TOKENS = 32, 2048, 16


@dataclass(frozen=True)
class ServingCase:
    side: int  # image side in pixels (square); (side / 2)^2 patches, (side / 4)^2 visual tokens
    requests: int

    @property
    def visual(self) -> int:
        return (self.side // 4) ** 2

    def name(self) -> str:
        return f"vllm qwen2_5_vl tiny {self.visual} visual x{self.requests}"


def serving_cases(smoke: bool) -> tuple[list[ServingCase], list[float]]:
    """(cases, keep ratios): 256, 576 and 1024 visual tokens per request; 10% and 25% kept."""
    if smoke:
        return [ServingCase(128, 4)], [0.1]
    return [ServingCase(64, 8), ServingCase(96, 8), ServingCase(128, 8)], [0.1, 0.25]


def _question(seed: int) -> str:
    return f"Question {seed}: what is in the picture?"


class _Bench:
    def __init__(self) -> None:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        from glimpse_ops.vllm import testing

        self.folder = testing.write_tiny_qwen2_5_vl(tempfile.mkdtemp(prefix="glimpse-vllm-bench-"), seed=3)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(self.folder).eval()
        self.engines: dict[float | None, object] = {}  # kept alive: shutting one down breaks the others

    def engine(self, ratio: float | None):
        import vllm

        import glimpse_ops.vllm as glimpse_vllm

        if ratio not in self.engines:
            settings = dict(enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False)
            if ratio is not None:
                glimpse_vllm.register()
                settings = glimpse_vllm.engine_kwargs(max_keep_ratio=ratio)
            self.engines[ratio] = vllm.LLM(
                model=str(self.folder), dtype="float32", max_model_len=2048, seed=0, block_size=BLOCK,
                num_gpu_blocks_override=POOL, limit_mm_per_prompt={"image": 1, "video": 0}, **settings,
            )  # fmt: skip
        return self.engines[ratio]

    def prompt(self, side: int, seed: int) -> dict:
        from glimpse_ops.vllm import testing

        text = testing.chat_prompt(self.tokenizer, _question(seed), with_image=True)
        return {"prompt": text, "multi_modal_data": {"image": testing.random_image(side, side, seed)}}

    def hf_tokens(self, side: int, seed: int, ratio: float | None) -> list[int]:
        from glimpse_ops import hf
        from glimpse_ops.vllm import testing

        x = testing.hf_inputs(self.folder, [(_question(seed), testing.random_image(side, side, seed))])
        kwargs = dict(max_new_tokens=OUTPUT_TOKENS, min_new_tokens=OUTPUT_TOKENS, do_sample=False)
        with torch.no_grad():
            if ratio is None:
                out = self.hf_model.generate(**x, **kwargs)
            else:
                with hf.pruned(self.hf_model, max_keep_ratio=ratio):
                    out = self.hf_model.generate(**x, **kwargs)
        return out[0, x["input_ids"].shape[1] :].tolist()


def _greedy(tokens: int = OUTPUT_TOKENS):
    import vllm

    return vllm.SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0)


def _pool(engine):
    return engine.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool


def _measure(bench: _Bench, case: ServingCase, ratio: float | None) -> dict:
    engine = bench.engine(ratio)
    pool, llm_engine = _pool(engine), engine.llm_engine
    prompts = [bench.prompt(case.side, seed) for seed in range(case.requests)]
    got = list(engine.generate([prompts[0]], _greedy(), use_tqdm=False)[0].outputs[0].token_ids)
    want = bench.hf_tokens(case.side, 0, ratio)
    row = {"provider": "stock" if ratio is None else "glimpse_ops", "keep_ratio": ratio}
    if got != want:
        return row | {"error": f"failed the correctness gate: vLLM {got[:8]}... != glimpse_ops.hf {want[:8]}..."}
    ttft = []
    for _ in range(5):
        start = time.perf_counter()
        engine.generate([prompts[0]], _greedy(1), use_tqdm=False)
        ttft.append(1e3 * (time.perf_counter() - start))
    free = pool.get_num_free_blocks()
    llm_engine.add_request("probe", prompts[0], _greedy())
    llm_engine.step()  # the prefill (and, with the plugin, the prune and the shrink)
    held = free - pool.get_num_free_blocks()
    (probe,) = llm_engine.engine_core.engine_core.scheduler.requests.values()
    prompt_tokens = probe.num_prompt_tokens  # after the prune: the L kept tokens
    while llm_engine.has_unfinished_requests():
        llm_engine.step()
    for seed, prompt in enumerate(prompts):
        llm_engine.add_request(f"r{seed}", prompt, _greedy())
    peak, outputs = 0, 0
    start = time.perf_counter()
    while llm_engine.has_unfinished_requests():
        for output in llm_engine.step():
            if output.finished:
                outputs += len(output.outputs[0].token_ids)
        peak = max(peak, free - pool.get_num_free_blocks())
    elapsed = time.perf_counter() - start
    per_request = math.ceil((prompt_tokens + OUTPUT_TOKENS) / BLOCK)  # once it has generated its tokens
    return row | {
        "ttft": quantiles(ttft),
        "ttft_ms": statistics.median(ttft),
        "requests_per_s": case.requests / elapsed,
        "output_tok_per_s": outputs / elapsed,
        "blocks_held_after_prefill": held,
        "peak_blocks_in_use": peak,
        "concurrent_requests_that_fit": POOL // per_request,
        "kv_blocks": POOL,
        "prompt_tokens_after_prefill": prompt_tokens,
        "output_tokens_per_request": OUTPUT_TOKENS,
    }


def rows_per_engine(base: dict, ratios: list[float], measure, progress) -> list[dict]:
    """``base | measure(ratio)`` for stock (ratio None) and each keep ratio; a provider that
    raises is reported in its row, and the run goes on (and fails at the end)."""
    rows = []
    for ratio in [None, *ratios]:
        try:
            rows.append(base | measure(ratio))
        except Exception as error:
            row = base | {"provider": "stock" if ratio is None else "glimpse_ops", "keep_ratio": ratio}
            record_error(row, error)
            rows.append(row)
        progress.step(f"{base['name']} {rows[-1]['provider']} {ratio or ''}")
    return rows


def run_serving_case(bench: _Bench, case: ServingCase, ratios: list[float], progress) -> list[dict]:
    base = {"name": case.name(), "visual": case.visual, "requests": case.requests, "kind": "vllm"}
    rows = rows_per_engine(base, ratios, lambda ratio: _measure(bench, case, ratio), progress)
    stock = rows[0]
    for row in rows[1:]:
        if "ttft_ms" in row and "ttft_ms" in stock:
            row["concurrency_vs_stock"] = row["concurrent_requests_that_fit"] / stock["concurrent_requests_that_fit"]
            row["requests_per_s_vs_stock"] = row["requests_per_s"] / stock["requests_per_s"]
            row["ttft_vs_stock"] = stock["ttft_ms"] / row["ttft_ms"]
    return rows


def print_serving_table(rows: list[dict]) -> None:
    header = (
        f"{'case':<34} {'provider':<12} {'keep':>5} {'TTFT ms':>8} {'spread':>6} {'req/s':>7} {'tok/s':>7} "
        f"{'blocks/req':>10} {'peak blocks':>11} {'fit':>5} {'fit x':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        keep = f"{row['keep_ratio']:.2f}" if row.get("keep_ratio") else "-"
        if "ttft_ms" not in row:
            print(f"{row['name']:<34} {row['provider']:<12} {keep:>5} {row.get('error', '')[:90]}")
            continue
        print(
            f"{row['name']:<34} {row['provider']:<12} {keep:>5} {row['ttft_ms']:>8.1f} {spread_text(row['ttft']):>6} "
            f"{row['requests_per_s']:>7.2f} "
            f"{row['output_tok_per_s']:>7.1f} {row['blocks_held_after_prefill']:>10} {row['peak_blocks_in_use']:>11} "
            f"{row['concurrent_requests_that_fit']:>5} {row.get('concurrency_vs_stock', 1.0):>5.2f}x"
        )


def make_bench() -> _Bench:
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            "bench/run.py --vllm needs vLLM 0.32 (on a CPU machine: bash tests/vllm_plugin/make_venv.sh VENV, "
            f"then VENV/bin/python bench/run.py --vllm): {error}"
        ) from error
    return _Bench()
