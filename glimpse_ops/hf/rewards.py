"""Rewards for GlimpsePrune+'s GRPO stage: exact match on short answers, and an LLM judge
behind any OpenAI-compatible endpoint (``vllm serve``, a hosted API), as the official code
scores free-form answers.

A reward function takes (questions, completions, answers), lists of str of one length, and
returns one float in [0, 1] per completion, or None where no reward could be computed (the
judge did not answer after its retries): the trainer skips that rollout and counts it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RewardFunction = Callable[[Sequence[str], Sequence[str], Sequence[str]], list]

# the official judge's prompts (HVision-NKU/GlimpsePrune utils.py, LLMClient), verbatim
JUDGE_SYSTEM_PROMPT = """
You are responsible for proofreading the answers, you need to give a score to the model's answer by referring to the standard answer, based on the given question. The full score is 1 point and the minimum score is 0 points. Please output the score in the form "score: <score>". The evaluation criteria require that the closer the model's answer is to the standard answer, the higher the score.
"""  # noqa: E501
JUDGE_USER_PROMPT = """
question: {}
standard answer: {}
model's answer: {}
"""
_SCORE = re.compile(r"score: ([\d\.]+)")
_EDGE_PUNCTUATION = ".,;:!?\"'`"


def normalize_short_answer(text: str) -> str:
    """The comparison form of a short answer: lower case, whitespace collapsed, and the
    punctuation and quotes a one-word answer picks up at its ends stripped ("Yes." -> "yes",
    '"Red"' -> "red"); what the official short-answer prompt ("Answer the question using a
    single word or phrase.") leaves to compare. Inner punctuation stays ("3.5", "t-shirt")."""
    return " ".join(text.lower().split()).strip(_EDGE_PUNCTUATION + " ")


def exact_match(
    questions: Sequence[str], completions: Sequence[str], answers: Sequence[str], official: bool = False
) -> list[float]:
    """1.0 where the completion equals the answer after ``normalize_short_answer``, else 0.0.
    ``official=True``: the official ``precision_match`` (``strip().lower()`` equality only)."""
    _same_lengths("exact_match", questions, completions, answers)
    norm = (lambda s: s.strip().lower()) if official else normalize_short_answer
    return [float(norm(c) == norm(a)) for c, a in zip(completions, answers)]


def parse_judge_score(text: str) -> float:
    """The official parsing: the reply (lower-cased) must contain "score: <number>" exactly
    once; the number is clipped to [0, 1]; anything else scores 0."""
    found = _SCORE.findall(text.lower())
    if len(found) != 1:
        return 0.0
    try:
        value = float(found[0])
    except ValueError:  # "score: 1.2.3"
        return 0.0
    return min(1.0, max(0.0, value))


@dataclass
class LLMJudge:
    """An LLM judge at ``base_url`` (an OpenAI-compatible server, e.g. ``vllm serve MODEL``
    -> ``http://127.0.0.1:8000/v1``), through the official ``openai`` client, with the official
    prompts, temperature 0 and parsing (``parse_judge_score``). Each request has ``timeout``
    seconds and ``retries`` more tries after a failure (connection, timeout, server error);
    a completion whose requests all fail gets None (skipped by the trainer) and is counted in
    ``failures``. ``exact_first``: an exact match scores 1 without asking (the official
    ``precision_match_or_llm``)."""

    base_url: str
    model: str
    api_key: str = "EMPTY"
    timeout: float = 30.0
    retries: int = 2
    exact_first: bool = False
    failures: int = 0
    requests: int = 0

    def __post_init__(self) -> None:
        try:
            from openai import OpenAI
        except ImportError as exc:
            raise ImportError(
                "glimpse_ops.hf.LLMJudge needs the openai client: pip install openai (or 'glimpse-ops[rl]')"
            ) from exc
        # the client's own retries are off: ours count failures and back off the same way everywhere
        self._client = OpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0)

    def check(self) -> None:
        """One request before training: a RuntimeError naming the URL and the model when the
        judge does not answer (so a wrong URL stops the run before any step, not after)."""
        try:
            self._client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=1
            )
        except Exception as exc:  # the openai client raises its own hierarchy
            raise RuntimeError(
                f"glimpse_ops.hf.LLMJudge: the judge at {self.base_url} (model {self.model!r}) does not answer: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def score_one(self, question: str, completion: str, answer: str) -> float | None:
        messages = [
            {"role": "system", "content": JUDGE_SYSTEM_PROMPT},
            {"role": "user", "content": JUDGE_USER_PROMPT.format(question, answer, completion)},
        ]
        for attempt in range(self.retries + 1):
            self.requests += 1
            try:
                reply = self._client.chat.completions.create(model=self.model, messages=messages, temperature=0.0)
                return parse_judge_score(reply.choices[0].message.content or "")
            except Exception:  # noqa: BLE001 - any failure of one request is retried, then skipped
                if attempt < self.retries:
                    time.sleep(min(2.0, 0.1 * 2**attempt))
        self.failures += 1
        return None

    def __call__(self, questions: Sequence[str], completions: Sequence[str], answers: Sequence[str]) -> list:
        _same_lengths("LLMJudge", questions, completions, answers)
        out: list = []
        for q, c, a in zip(questions, completions, answers):
            if self.exact_first and normalize_short_answer(c) == normalize_short_answer(a):
                out.append(1.0)
            else:
                out.append(self.score_one(q, c, a))
        return out


def _same_lengths(where: str, *lists: Sequence[str]) -> None:
    lengths = [len(x) for x in lists]
    if len(set(lengths)) != 1:
        raise ValueError(f"glimpse_ops.hf.{where}: questions, completions and answers differ in length: {lengths}")
