"""Moved to ``glimpse_ops.hf.patch`` (the patch-handle base); this path works for one more release."""

from .._moved import warn_moved
from .patch import *  # noqa: F403

warn_moved(__name__, "glimpse_ops.hf.patch")
