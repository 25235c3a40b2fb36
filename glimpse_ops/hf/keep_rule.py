"""Moved to ``glimpse_ops.glimpseprune.keep_rule`` (transformers-free); this path works for one more release."""

from .._moved import warn_moved
from ..glimpseprune.keep_rule import *  # noqa: F403

warn_moved(__name__, "glimpse_ops.glimpseprune.keep_rule")
