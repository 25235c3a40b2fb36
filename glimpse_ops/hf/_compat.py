"""The transformers versions glimpse_ops.hf supports, checked when a patch is applied."""

from __future__ import annotations

import re

SUPPORTED = ((5, 17), (5, 24))  # [5.17, 5.24): 5.17.x .. 5.23.x
SUPPORTED_TEXT = "5.17 to 5.23"


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise RuntimeError(f"glimpse_ops.hf: cannot read the transformers version {version!r}")
    return int(match.group(1)), int(match.group(2))


def require_transformers(version: str | None = None) -> str:
    """Import transformers and check its version; returns it. Raises ImportError when it
    is missing and RuntimeError outside the supported range."""
    if version is None:
        try:
            import transformers
        except ImportError as error:
            raise ImportError(
                "glimpse_ops.hf needs Hugging Face transformers: pip install 'glimpse-ops[hf]' "
                f"(supported: transformers {SUPPORTED_TEXT})"
            ) from error
        version = transformers.__version__
    low, high = SUPPORTED
    if not low <= _version_tuple(version) < high:
        raise RuntimeError(f"glimpse_ops.hf supports transformers {SUPPORTED_TEXT}, found {version}")
    return version
