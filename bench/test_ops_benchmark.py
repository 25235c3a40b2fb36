"""The ops as a pytest-benchmark suite: the cases of bench/registry.py and the providers of
bench/run.py, each gated on correctness against the reference before it is timed.

    pytest bench --benchmark-only                       # the small grid (about a minute on 2 cores)
    pytest bench --benchmark-only --grid full           # every size, batch and keep ratio
    pytest bench --benchmark-disable                    # correctness gates only (CI)

Each round is one call, timed cold like bench/run.py (the caches evicted in the round's
untimed setup) and synchronized on CUDA. Saved JSON (``--benchmark-autosave``) carries per
case: bytes moved, GB/s, % of the case's copy ceiling and the speed-up over the eager peer
(those two when the copy and eager rows ran earlier in the session; they are ordered first).
"""

from __future__ import annotations

import pytest
import run
from timing import default_device, evict_caches, settle, sync

_cases: dict = {}  # case -> (inputs, the reference's outputs), built once per session
_medians: dict = {}  # (case, provider) -> median ms of this session


@pytest.fixture
def device(request) -> str:
    return default_device(request.config.getoption("--device"))


def _timed_call(fn, inputs: dict, device: str):
    def call():
        out = fn(inputs)
        sync(device)
        return out

    return call


def test_op(benchmark, op_case, device):
    case, provider = op_case
    if case not in _cases:
        _cases.clear()  # one case's inputs at a time: the full grid's largest are GBs
        _cases[case] = run.case_inputs(case, device)
    inputs, want = _cases[case]
    fn = run.providers_for(case, device, {provider})[provider]
    if provider != "copy":
        ok, note = run.check(case, provider, fn(run.fresh_inputs(case, inputs)), want)
        assert ok, f"{case.name()} {provider} failed the correctness gate: {note}"
        benchmark.extra_info["check"] = note
    call = _timed_call(fn, run.fresh_inputs(case, inputs), device)  # an in-place op never moves the pristine inputs
    if benchmark.disabled:  # --benchmark-disable: one plain call, the gate above is the test
        benchmark(call)
        return
    settle(call, f"{case.name()} {provider}")  # compile before timing (bench/run.py's warm-up)
    benchmark.pedantic(call, setup=lambda: evict_caches(device), rounds=10 if device == "cpu" else 50,
                       iterations=1, warmup_rounds=1)  # fmt: skip
    p50 = benchmark.stats.stats.median * 1e3
    _medians[case, provider] = p50
    copy = _medians.get((case, "copy"))
    ceiling = run.figures(case, copy, None, None)["gbps"] if copy else None
    benchmark.extra_info.update(
        {"case": case.as_dict(), "provider": provider, **run.figures(case, p50, ceiling, _medians.get((case, "eager")))}
    )
