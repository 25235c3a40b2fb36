"""The transformers versions glimpse_ops.hf supports, checked when a patch is applied."""

from __future__ import annotations

import re

SUPPORTED = ((5, 17), (5, 26))  # [5.17, 5.26): 5.17.x .. 5.25.x
SUPPORTED_TEXT = "5.17 to 5.25"


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


def cache_kwarg(kwargs: dict):
    """The KV cache a model or decoder layer was called with: ``cache`` from transformers 5.25
    (``past_key_values`` is its deprecated name there), ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def is_checkpointing(model) -> bool:
    """Whether HF activation checkpointing is on (``is_activation_checkpointing`` from 5.25,
    where ``is_gradient_checkpointing`` is its deprecated alias)."""
    renamed = hasattr(type(model), "is_activation_checkpointing")
    return bool(getattr(model, "is_activation_checkpointing" if renamed else "is_gradient_checkpointing", False))


def set_checkpointing(model, on: bool) -> None:
    """HF activation checkpointing on (non-reentrant) or off, by the names of the installed
    transformers (5.25 renamed ``gradient_checkpointing_*`` to ``activation_checkpointing_*``)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
