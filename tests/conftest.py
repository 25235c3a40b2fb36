"""Fixtures for every test (helpers live in helpers.py).

* Every test runs with deterministic algorithms and ``fill_uninitialized_memory``: each
  fresh allocation (``torch.empty`` in Python, ``at::empty`` in C++, Triton launchers'
  outputs) is poisoned with NaN (floats) or the max value (ints), so an output slot a kernel
  forgets to write fails the comparison.
* ``seed`` draws a fresh seed per test (recorded in the report), never a fixed one.
* The hypothesis profile ``mutants`` (``--hypothesis-profile mutants``) skips shrinking.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import Phase, settings

# tests/mutants.py runs many suites that are meant to fail: it reports which tests fail, so
# shrinking the failing examples (minutes under the Triton interpreter) is skipped there
settings.register_profile("mutants", phases=[Phase.explicit, Phase.generate], database=None)


@pytest.fixture(autouse=True)
def poison_fresh_allocations():
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


@pytest.fixture
def seed(request):
    """A fresh seed per test run (printed on failure), never a fixed one."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value
