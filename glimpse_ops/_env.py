"""Process settings read from the environment: a leaf module (it imports nothing of the
package), so that the Triton kernels can depend on it and on nothing above them."""

from __future__ import annotations

import os


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1: Triton kernels run on CPU tensors (slowly). The one
    place that reads the variable."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
