"""Old module paths that keep working for one release after a move, with a DeprecationWarning."""

from __future__ import annotations

import warnings


def warn_moved(old: str, new: str) -> None:
    """Called by the module left at ``old``, which re-exports ``new``."""
    warnings.warn(f"{old} moved to {new}; the old path goes away in the next release", DeprecationWarning, stacklevel=3)
