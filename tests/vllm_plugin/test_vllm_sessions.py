"""Streaming-input sessions (``AsyncLLM.generate`` with an input stream, vLLM's ``resumable``
requests) on the pruning engine: served unpruned, they answer what the stock engine answers
for every input of the session, while an ordinary image request beside them is pruned. Each
engine runs in its own process (``session_generate.py``). Skipped without vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import glimpse_ops  # noqa: E402

SCRIPT = Path(__file__).with_name("session_generate.py")


def _run(tmp_path: Path, checkpoint, *flags: str) -> dict:
    out = tmp_path / f"session{'-'.join(flags)}.json"
    source = str(Path(glimpse_ops.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    done = subprocess.run([sys.executable, str(SCRIPT), str(checkpoint), str(out), *flags], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return json.loads(out.read_text())


def test_a_streaming_input_session_is_served_unpruned(tmp_path, checkpoint):
    plugin, stock = _run(tmp_path, checkpoint), _run(tmp_path, checkpoint, "--stock")
    steps = 6
    assert len(stock["session"]) == 2 * steps, "both inputs of the session decoded"
    assert plugin["session"] == stock["session"], "the session is the stock engine's, input after input"
    assert plugin["session_report"] is None or "glimpse" not in plugin["session_report"]
    report = plugin["plain_report"]["glimpse"]
    assert 0 < report["kept_visual_tokens"] < report["visual_tokens"], "the request beside the session was pruned"
    assert len(plugin["plain"]) == steps and stock["plain_report"] is None
