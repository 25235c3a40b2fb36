"""``apply_glimpse_prune`` and the ``pruned`` context manager: GlimpsePrune on a Hugging Face
model instance, training-free (``prune_hooks``) or with a trained predictor
(``predictor_hooks``)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ._compat import require_transformers
from .adapters import adapter_for
from .hooks import ensure_unpatched
from .predictor_hooks import PredictorPruneHandle, load_predictor
from .prune_hooks import GlimpsePruneHandle, Selection

SUPPORTED_ATTENTION = ("sdpa", "eager")


def apply_glimpse_prune(
    model: nn.Module,
    predictor=None,
    layer: int | None = None,
    threshold: float | None = None,
    max_keep_ratio: float | None = None,
    min_keep: int = 1,
    selection: Selection | None = None,
) -> GlimpsePruneHandle:
    """Patch one Qwen2.5-VL / Qwen2-VL / LLaVA model instance to prune its visual tokens
    after decoder layer ``layer`` at every prefill. Returns a handle whose ``remove()``
    restores the model.

    Training-free mode (``predictor=None``; ``layer`` defaults to about 2/3 of the depth):
    the last prompt token's layer-K query is the glimpse; visual tokens are ranked by its
    head-averaged attention probabilities and the top ``ceil(max_keep_ratio * Nv)`` per
    sample are kept (default ratio 0.1; ``threshold`` on that probability keeps fewer).

    Trained mode (Qwen2.5-VL): ``predictor`` is a ``GlimpsePredictor``, a ``.safetensors``
    file written by ``GlimpsePredictor.save``, or a folder of the GlimpsePrune release
    (``config.json`` + ``new_modules_gp.pt``). The layer is the predictor's; tokens with
    sigmoid(VIP) > ``threshold`` (default 0.5) are kept, at most ``floor(max_keep_ratio *
    Nv)``, at least ``min_keep``.

    ``threshold=None`` with ``max_keep_ratio=1.0`` keeps every token.

    ``selection`` (training-free mode only) replaces how tokens are chosen and the caches
    compacted at layer K: a function of ``SelectionInputs`` returning (keys, values, index,
    scores); the default is ``glimpse_prune_selection`` (one ``glimpse_prune`` op).
    """
    require_transformers()
    ensure_unpatched(model, "apply_glimpse_prune")
    adapter = adapter_for(model)
    if adapter.attn_implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"glimpse_ops.hf.apply_glimpse_prune: attention implementation {adapter.attn_implementation!r} "
            "is not supported yet "
            f"(supported: {', '.join(SUPPORTED_ATTENTION)})"
        )
    handle_class = GlimpsePruneHandle
    if predictor is not None:
        if selection is not None:
            raise ValueError("glimpse_ops.hf.apply_glimpse_prune: selection= applies to the training-free mode; "
                             "with a predictor the VIP selects")  # fmt: skip
        if adapter.model_type != "qwen2_5_vl":
            raise TypeError(
                f"glimpse_ops.hf.apply_glimpse_prune: a trained predictor needs Qwen2.5-VL, got {adapter.model_type}"
            )
        predictor = load_predictor(predictor, model)
        if layer is not None and layer != predictor.config.score_layer:
            raise ValueError(
                "glimpse_ops.hf.apply_glimpse_prune: the predictor was trained for layer "
                f"{predictor.config.score_layer}, got layer={layer}"
            )
        layer = predictor.config.score_layer
        if threshold is None and max_keep_ratio is None:
            threshold = 0.5
        handle_class = PredictorPruneHandle
    elif threshold is None and max_keep_ratio is None:
        max_keep_ratio = 0.1
    n_layers = len(adapter.layers)
    if layer is None:
        layer = max(0, math.ceil(2 * n_layers / 3) - 1)
    if not 0 <= layer < n_layers - 1:
        raise ValueError(f"glimpse_ops.hf.apply_glimpse_prune: layer must be in [0, {n_layers - 1}), got {layer}")
    if max_keep_ratio is not None and not 0 < max_keep_ratio <= 1:
        raise ValueError(f"glimpse_ops.hf.apply_glimpse_prune: max_keep_ratio must be in (0, 1], got {max_keep_ratio}")
    if min_keep < 0:
        raise ValueError(f"glimpse_ops.hf.apply_glimpse_prune: min_keep must be >= 0, got {min_keep}")
    handle = handle_class(model, adapter, layer, threshold, max_keep_ratio, min_keep)
    if selection is not None:
        handle.selection = selection
    handle.claim("apply_glimpse_prune")
    target = adapter.layers[layer]
    handle.hooks += [
        adapter.multimodal.register_forward_pre_hook(handle._on_multimodal, with_kwargs=True),
        target.register_forward_pre_hook(handle._before_layer_k, with_kwargs=True),
        target.self_attn.q_proj.register_forward_hook(handle._on_q_proj),
        target.register_forward_hook(handle._after_layer_k, with_kwargs=True),
    ]
    handle.hooks += [
        adapter.layers[i].register_forward_pre_hook(handle._before_later_layer, with_kwargs=True)
        for i in range(layer + 1, n_layers)
    ]
    if predictor is not None:
        handle.predictor = predictor.to(next(model.parameters()).device)
        handle.attach_predictor_hooks(model)
    handle._wrap_generate_kwargs()
    return handle


@contextmanager
def pruned(model: nn.Module, **kwargs) -> Iterator[GlimpsePruneHandle]:
    """``apply_glimpse_prune`` for the duration of a ``with`` block."""
    handle = apply_glimpse_prune(model, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
