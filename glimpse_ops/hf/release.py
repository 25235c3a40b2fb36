"""Moved to ``glimpse_ops.glimpseprune.release`` (transformers-free); this path works for one more release."""

from .._moved import warn_moved
from ..glimpseprune.release import *  # noqa: F403

warn_moved(__name__, "glimpse_ops.glimpseprune.release")
