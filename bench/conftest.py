"""pytest-benchmark suite of bench/ (``pytest bench --benchmark-only``): options and the
case x provider parametrization, both from bench/run.py's registry and providers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules import each other by name

GRIDS = ("small", "cpu-default", "full")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("glimpse-ops benchmarks")
    group.addoption(
        "--grid", choices=GRIDS, default="small",
        help="small: 4k visual tokens, B=1, 10%% kept, every op (about a minute on 2 CPU cores); "
        "cpu-default: bench/run.py's CPU subset; full: every size, batch and keep ratio",
    )  # fmt: skip
    group.addoption("--device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--providers", default=None, help="comma-separated subset of bench/run.py's providers")


def bench_device(config: pytest.Config) -> str:
    from timing import default_device

    return default_device(config.getoption("--device"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "op_case" not in metafunc.fixturenames:
        return
    import run
    from registry import all_cases

    config = metafunc.config
    grid = config.getoption("--grid")
    device = bench_device(config)
    cases = all_cases(smoke=grid == "small", full=grid == "full" or device == "cuda" and grid != "small")
    chosen = config.getoption("--providers")
    wanted = set(chosen.split(",")) if chosen else set(run.PROVIDERS)
    params, ids = [], []
    for case in cases:
        # the copy ceiling first and the eager peer next: later rows report % copy and the speed-up
        names = sorted(run.providers_for(case, device, wanted), key=lambda n: (n != "copy", n != "eager"))
        for name in names:
            params.append((case, name))
            ids.append(f"{case.name()}-{name}".replace(" ", "-"))
    metafunc.parametrize("op_case", params, ids=ids)
