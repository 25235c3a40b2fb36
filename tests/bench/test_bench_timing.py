"""What the benchmark's figures mean (issue: trustworthy figures), tested on CPU with stubs and a
fake clock, never on real timings: decode is timed per step inside generate (its setup and
the prefill are outside every step), no compilation happens inside a timed loop (warm-up
until nothing compiles; a compile while timing fails loudly), and every median comes with
its p20-p80 spread, flagged above 20%."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

import timing  # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class StubModel:
    """generate(): 40 ms of setup, a 25 ms prefill, then 2 ms per decode step; it calls its
    stopping criteria once per token, as transformers' generate does."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def generate(self, input_ids, max_new_tokens, min_new_tokens, do_sample, stopping_criteria):
        self.clock.now += 0.040  # generation-config preparation and validation
        ids = input_ids
        for step in range(max_new_tokens):
            self.clock.now += 0.025 if step == 0 else 0.002
            ids = torch.cat([ids, ids[:, -1:]], dim=1)
            for criterion in stopping_criteria:
                assert not bool(criterion(ids, None).any())
        return ids


def test_decode_is_timed_per_step_without_generate_setup_or_prefill():
    pytest.importorskip("transformers")
    from e2e_hf import decode_step_ms

    clock = FakeClock()
    steps = decode_step_ms(StubModel(clock), {"input_ids": torch.ones(2, 5, dtype=torch.long)}, 6, "cpu", 3, clock)
    assert steps == pytest.approx([2.0] * (5 * 3)), "only the gaps between tokens after the first"


@pytest.fixture
def compiles(monkeypatch) -> dict:
    """A stand-in compile counter the test bumps: {"n": compilations so far}."""
    count = {"n": 0}
    monkeypatch.setattr(timing.CompileWatch, "count", classmethod(lambda cls: count["n"]))
    return count


def test_a_compile_inside_the_timed_loop_fails_loudly(compiles):
    calls, count = {"n": 0}, compiles

    def compiles_on_the_fourth_call():
        calls["n"] += 1
        if calls["n"] == 4:
            count["n"] += 1  # e.g. a new shape reaching torch.compile or a new Triton specialization

    with pytest.raises(timing.RecompiledWhileTiming, match="inside the timed loop"):
        timing.time_ms(compiles_on_the_fourth_call, "cpu", 0.0)


def test_warm_up_runs_until_nothing_compiles(compiles):
    calls, count = {"n": 0}, compiles

    def compiles_on_the_first_two_calls():
        calls["n"] += 1
        if calls["n"] <= 2:
            count["n"] += 1

    stats = timing.time_ms(compiles_on_the_first_two_calls, "cpu", 0.0)
    assert calls["n"] == 3 + stats["reps"], "three warm-up calls: two that compiled, one that did not"

    def always_compiles():
        count["n"] += 1

    with pytest.raises(timing.RecompiledWhileTiming, match="still compiles after 5 warm-up calls"):
        timing.time_ms(always_compiles, "cpu", 0.0)


def test_compile_watch_counts_torch_compile_graphs():
    before = timing.CompileWatch.count()
    f = torch.compile(lambda x: x * 2 + 1, backend="eager")
    f(torch.ones(3))
    assert timing.CompileWatch.count() > before
    seen = timing.CompileWatch.count()
    f(torch.ones(3))
    assert timing.CompileWatch.count() == seen, "a cached graph is not a compile"


def test_spreads_are_printed_beside_medians_and_flagged_above_20_percent(capsys):
    import run

    steady = {"p20": 0.95, "p50": 1.0, "p80": 1.05, "reps": 9}
    noisy = {"p20": 0.8, "p50": 1.0, "p80": 1.3, "reps": 9}
    assert timing.spread_text(steady) == "10% " and timing.spread_text(noisy) == "50%!"
    rows = [
        {"name": "case", "provider": p, **stats, "gbps": 1.0, "pct_copy_bw": 1.0}
        for p, stats in (("steady", steady), ("noisy", noisy))
    ]
    run.print_table(rows, "cpu")
    out = capsys.readouterr().out.splitlines()
    steady_line = next(line for line in out if " steady " in line)
    noisy_line = next(line for line in out if " noisy " in line)
    assert "10%" in steady_line and "!" not in steady_line
    assert "50%!" in noisy_line


def test_cold_timing_evicts_the_caches_before_each_call_outside_the_timed_span(monkeypatch):
    clock, events = FakeClock(), []

    def evict(device):
        events.append("evict")
        clock.now += 1.0  # slow on purpose: none of it may reach a sample

    def op():
        events.append("op")
        clock.now += 0.002

    monkeypatch.setattr(timing.time, "perf_counter", clock)
    monkeypatch.setattr(timing, "evict_caches", evict)
    stats = timing.time_ms(op, "cpu", 0.0, cold=True)
    timed = events[events.index("evict") :]
    assert timed == ["evict", "op"] * stats["reps"], "one eviction before every timed call"
    assert stats["p20"] == pytest.approx(2.0) and stats["p80"] == pytest.approx(2.0)


def test_the_real_eviction_reads_more_than_the_last_level_cache():
    timing.evict_caches("cpu")
    buffer = timing._evict_buffers["cpu"]
    assert buffer.numel() * buffer.element_size() >= 64 * 2**20
