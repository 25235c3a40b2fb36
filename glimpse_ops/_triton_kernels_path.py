"""Where ``glimpse_ops.triton_kernels`` comes from.

The Triton kernels live in the repository's top-level ``triton_kernels/`` folder and install
as ``glimpse_ops.triton_kernels`` (pyproject.toml maps the folder). When this package is run
from a source checkout (installed editable or not installed at all) the folder beside it is
mapped here, so the kernels always come from the same checkout as the package, never from
another editable install's finder.

The folder has no ``__init__.py`` on purpose: with the repository root on ``sys.path`` (tests,
``python -m`` from the root) a regular package there would shadow upstream Triton's own
top-level ``triton_kernels`` package, which vLLM imports on GPUs; a folder without
``__init__.py`` loses to any regular package of that name later on the path.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

NAME = "glimpse_ops.triton_kernels"
MARKER = "compact_kv.py"  # a file only our kernel folder has


def map_source_checkout_kernels() -> None:
    """Register the checkout's ``triton_kernels/`` as ``glimpse_ops.triton_kernels`` when this
    package sits in a source checkout; an installed wheel has the subpackage in place."""
    if NAME in sys.modules:
        return
    package_dir = Path(__file__).resolve().parent
    if (package_dir / "triton_kernels" / MARKER).exists():
        return
    sibling = package_dir.parent / "triton_kernels"
    if not (sibling / MARKER).exists():
        return
    spec = importlib.machinery.ModuleSpec(NAME, None, is_package=True)
    spec.submodule_search_locations = [str(sibling)]
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "Triton kernels and their launchers (one op per module; see the repository's triton_kernels/)."
    sys.modules[NAME] = module


def _own_locations() -> set[Path]:
    package_dir = Path(__file__).resolve().parent
    return {package_dir / "triton_kernels", package_dir.parent / "triton_kernels"}


def kernels_missing_reason() -> str | None:
    """None when ``glimpse_ops.triton_kernels`` is this package's own kernel folder, else what
    is wrong and what to do (another checkout's editable finder must not supply them)."""
    fix = "reinstall with `pip install --no-build-isolation -e .` from the repository root"
    try:
        spec = importlib.util.find_spec(NAME)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        return f"glimpse_ops.triton_kernels is not installed with this package ({fix})"
    found = {Path(p).resolve() for p in (spec.submodule_search_locations or [])}
    if not found & _own_locations():
        where = ", ".join(sorted(str(p) for p in found)) or "?"
        return f"glimpse_ops.triton_kernels resolves to {where}, not to this package's own kernels ({fix})"
    return None
