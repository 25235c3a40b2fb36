"""glimpse_ops.hf.rewards: exact match, and the LLM judge through the official openai client
against a real HTTP server on 127.0.0.1 (tests/rl/chat_server.py). CI runs the judge tests in
the vLLM venv, which has openai; elsewhere they skip."""

from __future__ import annotations

import re
import socket
import time

import pytest
from chat_server import ChatServer

from glimpse_ops.hf.rewards import (
    JUDGE_SYSTEM_PROMPT,
    LLMJudge,
    exact_match,
    normalize_short_answer,
    parse_judge_score,
)


def test_exact_match_normalizes_a_short_answer():
    assert normalize_short_answer('  "Yes."  ') == "yes"
    assert normalize_short_answer("The  Red\tcar!") == "the red car"
    assert normalize_short_answer("3.5") == "3.5" and normalize_short_answer("t-shirt.") == "t-shirt"
    got = exact_match(["q"] * 4, ["Yes.", "no", "Two", " blue "], ["yes", "yes", "2", "Blue"])
    assert got == [1.0, 0.0, 0.0, 1.0]
    assert exact_match(["q", "q"], ["Yes.", " YES "], ["yes", "yes"], official=True) == [0.0, 1.0]
    with pytest.raises(ValueError, match="differ in length"):
        exact_match(["q"], ["a", "b"], ["a"])


@pytest.mark.parametrize(
    "reply, want",
    [("score: 0.8", 0.8), ("Score: 2", 1.0), ("The answer is right. score: 1", 1.0), ("no idea", 0.0),
     ("score: 0.5, score: 0.6", 0.0), ("score: 1.2.3", 0.0), ("score:0.5", 0.0)],
)  # fmt: skip
def test_the_judge_reply_is_parsed_as_the_official_judge_does(reply, want):
    assert parse_judge_score(reply) == want


def _judge_reply(messages: list[dict]) -> str:
    """A scripted judge: full marks when the model's answer contains the standard answer."""
    user = messages[-1]["content"]
    standard, answer = re.search(r"standard answer: (.*)\n", user), re.search(r"model's answer: (.*)\n", user)
    if standard is None or answer is None:
        return "Hello! How can I help?"  # LLMJudge.check's greeting
    standard, answer = standard.group(1), answer.group(1)
    return "score: 1.0" if standard.lower() in answer.lower() else "score: 0.2"


@pytest.fixture
def server():
    pytest.importorskip("openai")
    with ChatServer(_judge_reply) as s:
        yield s


def test_the_judge_asks_with_the_official_prompt_and_scores(server):
    judge = LLMJudge(server.url, "judge-model", timeout=5.0)
    judge.check()
    got = judge(["What color is the car?", "How many?"], ["It is red.", "three"], ["red", "two"])
    assert got == [1.0, 0.2]
    request = server.requests[-1]
    assert request["model"] == "judge-model" and request["temperature"] == 0.0
    assert request["messages"][0] == {"role": "system", "content": JUDGE_SYSTEM_PROMPT}
    assert request["messages"][1]["content"] == "\nquestion: How many?\nstandard answer: two\nmodel's answer: three\n"
    assert judge.failures == 0


def test_exact_first_skips_the_request(server):
    judge = LLMJudge(server.url, "judge-model", exact_first=True)
    assert judge(["q", "q"], ["Red.", "crimson"], ["red", "red"]) == [1.0, 0.2]
    assert len(server.requests) == 1


def test_a_failing_judge_is_retried_then_skipped_and_the_run_goes_on(server):
    judge = LLMJudge(server.url, "judge-model", timeout=5.0, retries=2)
    server.fail_next = 2  # two server errors, then an answer: within the retries
    assert judge(["q"], ["red"], ["red"]) == [1.0]
    assert judge.requests == 3 and judge.failures == 0
    server.fail_next = 3 + 1  # every try of the first completion fails, and one try of the second
    assert judge(["q", "q"], ["red", "blue"], ["red", "red"]) == [None, 0.2]
    assert judge.failures == 1


def test_a_stalled_judge_times_out_and_is_skipped(server):
    judge = LLMJudge(server.url, "judge-model", timeout=0.5, retries=1)
    server.stall_next, server.stall_s = 2, 2.0
    start = time.monotonic()
    assert judge(["q", "q"], ["red", "red"], ["red", "red"]) == [None, 1.0]
    assert time.monotonic() - start < 6, "each try waits its timeout, not the stall"
    assert judge.failures == 1


def test_a_judge_url_that_does_not_answer_is_refused_before_training():
    pytest.importorskip("openai")
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = LLMJudge(f"http://127.0.0.1:{port}/v1", "judge-model", timeout=2.0)
    with pytest.raises(RuntimeError, match=f"judge at http://127.0.0.1:{port}/v1 .*does not answer"):
        judge.check()
