"""The pytest-benchmark suite (bench/test_ops_benchmark.py) runs the registry's cases with
bench/run.py's providers and reports through the same functions as bench/run.py: tested on
what they share, never on timings."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from helpers import REPO_ROOT

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, str(REPO_ROOT / "bench"))

import run  # noqa: E402
from registry import Case, all_cases  # noqa: E402


def test_the_default_selection_is_the_registry_smoke_grid_times_run_providers():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "--device", "cpu", "-p", "no:cacheprovider"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = {line.split("::", 1)[1] for line in done.stdout.splitlines() if "::test_op[" in line}
    want = {
        f"test_op[{case.name()}-{provider}]".replace(" ", "-")
        for case in all_cases(smoke=True)
        for provider in run.providers_for(case, "cpu", set(run.PROVIDERS))
    }
    assert collected == want


class FakeBenchmark:
    """pytest-benchmark's fixture as the suite uses it: one setup and call per round, a median."""

    disabled = False

    def __init__(self, median_s: float) -> None:
        self.median_s, self.extra_info, self.calls = median_s, {}, []

    def pedantic(self, fn, setup, rounds, iterations, warmup_rounds):
        setup()
        self.calls.append(fn())
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=self.median_s))


def test_the_suite_and_run_py_report_through_the_same_functions(monkeypatch):
    import test_ops_benchmark as suite

    case = Case("compact_kv", 1024, 0.10, 1)
    spied = {"check": [], "figures": []}
    check, figures = run.check, run.figures
    monkeypatch.setattr(run, "check", lambda *a: spied["check"].append(a[1]) or check(*a))
    monkeypatch.setattr(run, "figures", lambda *a: spied["figures"].append(a) or figures(*a))
    monkeypatch.setattr(suite, "evict_caches", lambda device: None)
    suite._medians.clear()
    for provider, median_s in (("copy", 0.001), ("eager", 0.008), ("native", 0.002)):
        bench = FakeBenchmark(median_s)
        suite.test_op(bench, (case, provider), "cpu")
    assert spied["check"] == ["eager", "native"], "every provider but the copy is gated"
    assert any(a[0] == case and a[1] == pytest.approx(2.0) for a in spied["figures"]), "the suite uses run.figures"
    info = bench.extra_info
    assert info["speedup_vs_eager"] == pytest.approx(4.0)
    assert info["pct_copy_bw"] == pytest.approx(50.0)
    assert info == {"check": "exact", "case": case.as_dict(), "provider": "native",
                    **figures(case, 2.0, figures(case, 1.0, None, None)["gbps"], 8.0)}  # fmt: skip

    # bench/run.py's rows come from the same run.figures
    spied["figures"].clear()
    progress = SimpleNamespace(step=lambda label: None)
    rows = run.run_case(case, "cpu", {"copy", "native"}, 0.0, 1.0, progress)
    assert [a[0] for a in spied["figures"]].count(case) >= 2
    assert {r["provider"] for r in rows} == {"copy", "native"} and all("pct_copy_bw" in r for r in rows)


def test_a_provider_that_fails_the_gate_is_not_timed(monkeypatch):
    import test_ops_benchmark as suite

    case = Case("select_index", 1024, 0.10, 1)
    monkeypatch.setattr(run, "check", lambda *a: (False, "index agreement 0.5"))
    bench = FakeBenchmark(0.001)
    with pytest.raises(AssertionError, match="failed the correctness gate: index agreement 0.5"):
        suite.test_op(bench, (case, "native"), "cpu")
    assert bench.calls == []
