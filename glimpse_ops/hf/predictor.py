"""Moved to ``glimpse_ops.glimpseprune.predictor`` (transformers-free); this path works for one more release."""

from .._moved import warn_moved
from ..glimpseprune.predictor import *  # noqa: F403

warn_moved(__name__, "glimpse_ops.glimpseprune.predictor")
