"""``apply_glimpse_prune`` and the ``pruned`` context manager: GlimpsePrune on a Hugging Face
model instance, training-free (``prune_hooks``) or with a trained predictor
(``predictor_hooks``)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ._compat import require_transformers
from .adapters import adapter_for
from .hooks import ensure_unpatched
from .keep_rule import CAPS_PER, TrainedKeepRule
from .predictor import GlimpsePredictor
from .predictor_hooks import PredictorPruneHandle, load_predictor
from .prune_hooks import GlimpsePruneHandle, Selection
from .vit_taps import FAMILIES as VIT_TAP_FAMILIES

SUPPORTED_ATTENTION = ("sdpa", "eager")
TRAINED_MODEL_TYPES = VIT_TAP_FAMILIES  # the ViT taps and their token order are known (vit_taps.py)


def apply_glimpse_prune(
    model: nn.Module,
    predictor=None,
    layer: int | None = None,
    threshold: float | None = None,
    max_keep_ratio: float | None = None,
    min_keep: int | None = None,
    *,
    fixed_keep_ratio: float | None = None,
    caps_per: str | None = None,
    predictor_dtype: torch.dtype | str | None = None,
    selection: Selection | None = None,
) -> GlimpsePruneHandle:
    """Patch one Qwen2.5-VL / Qwen2-VL / LLaVA model instance to prune its visual tokens
    after decoder layer ``layer`` at every prefill. Returns a handle whose ``remove()``
    restores the model.

    Training-free mode (``predictor=None``; ``layer`` defaults to about 2/3 of the depth):
    the last prompt token's layer-K query is the glimpse; visual tokens are ranked by its
    head-averaged attention probabilities and the top ``ceil(max_keep_ratio * Nv)`` per
    sample are kept (the cap rounds up; default ratio 0.1; ``threshold`` on that probability
    keeps fewer; at least ``min_keep``, default 1). ``threshold=None`` with
    ``max_keep_ratio=1.0`` keeps every token.

    Trained mode (Qwen2.5-VL, Qwen3-VL, InternVL): ``predictor`` is a ``GlimpsePredictor``, a ``.safetensors``
    file written by ``GlimpsePredictor.save``, or a folder of the GlimpsePrune release
    (``config.json`` + ``new_modules_gp.pt``). The layer is the predictor's. The keep rule
    is the release's, per sample (``caps_per="sample"``, the default, as the release commit)
    or per image (``caps_per="image"``, as later versions): tokens with sigmoid(VIP) >
    ``threshold`` are kept, at most ``max(1, floor(max_keep_ratio * n))`` of them (the cap
    rounds down), at least ``min(min_keep, n)``; or, with ``fixed_keep_ratio`` r, exactly the
    top ``max(1, floor(r * n))``. Arguments not given take the predictor's values (the
    release's ``reduce_threshold`` 0.5, ``max_remain_ratio`` none, ``min_remain_num`` 1,
    ``fixed_remain_ratio`` none). ``predictor_dtype``: the dtype the glimpse rows and the
    VIP run in, default fp32 (see the README); ``"model"`` runs them in the model's dtype, as
    the release does.

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
    for name, ratio in (("max_keep_ratio", max_keep_ratio), ("fixed_keep_ratio", fixed_keep_ratio)):
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"glimpse_ops.hf.apply_glimpse_prune: {name} must be in (0, 1], got {ratio}")
    if min_keep is not None and min_keep < 0:
        raise ValueError(f"glimpse_ops.hf.apply_glimpse_prune: min_keep must be >= 0, got {min_keep}")
    handle_class = GlimpsePruneHandle
    if predictor is not None:
        if selection is not None:
            raise ValueError("glimpse_ops.hf.apply_glimpse_prune: selection= applies to the training-free mode; "
                             "with a predictor the VIP selects")  # fmt: skip
        if adapter.model_type not in TRAINED_MODEL_TYPES:
            raise TypeError(
                "glimpse_ops.hf.apply_glimpse_prune: a trained predictor needs Qwen2.5-VL, Qwen3-VL or InternVL, "
                f"got {adapter.model_type}"
            )
        if caps_per not in (None, *CAPS_PER):
            raise ValueError(
                f"glimpse_ops.hf.apply_glimpse_prune: caps_per must be 'sample' or 'image', got {caps_per!r}"
            )
        predictor = load_predictor(predictor, model)
        rule = TrainedKeepRule.resolve(
            predictor.config, threshold=threshold, max_keep_ratio=max_keep_ratio, min_keep=min_keep,
            fixed_keep_ratio=fixed_keep_ratio, caps_per=caps_per, where="glimpse_ops.hf.apply_glimpse_prune",
        )  # fmt: skip
        if layer is not None and layer != predictor.config.score_layer:
            raise ValueError(
                "glimpse_ops.hf.apply_glimpse_prune: the predictor was trained for layer "
                f"{predictor.config.score_layer}, got layer={layer}"
            )
        layer = predictor.config.score_layer
        threshold, max_keep_ratio, min_keep = rule.threshold, rule.max_keep_ratio, rule.min_keep
        fixed_keep_ratio, caps_per = rule.fixed_keep_ratio, rule.caps_per
        predictor = _placed(predictor, next(model.parameters()).device, _predictor_dtype(predictor_dtype, model))
        handle_class = PredictorPruneHandle
    else:
        for name, value in (("fixed_keep_ratio", fixed_keep_ratio), ("caps_per", caps_per),
                            ("predictor_dtype", predictor_dtype)):  # fmt: skip
            if value is not None:
                raise ValueError(f"glimpse_ops.hf.apply_glimpse_prune: {name} applies with a predictor only")
        if threshold is None and max_keep_ratio is None:
            max_keep_ratio = 0.1
        min_keep = 1 if min_keep is None else min_keep
    n_layers = len(adapter.layers)
    if layer is None:
        layer = max(0, math.ceil(2 * n_layers / 3) - 1)
    if not 0 <= layer < n_layers - 1:
        raise ValueError(f"glimpse_ops.hf.apply_glimpse_prune: layer must be in [0, {n_layers - 1}), got {layer}")
    trained = {}
    if predictor is not None:
        trained = dict(predictor=predictor, fixed_keep_ratio=fixed_keep_ratio, caps_per=caps_per or "sample")
    handle = handle_class(model, adapter, layer, threshold, max_keep_ratio, min_keep, **trained)
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
        handle.attach_predictor_hooks(model)
    if getattr(adapter.multimodal, "image_newline", None) is not None:
        handle.hooks.append(adapter.text_model.register_forward_pre_hook(handle._keep_image_newlines, with_kwargs=True))
    handle._wrap_generate_kwargs()
    handle._wrap_deepstack()
    return handle


def _placed(predictor: GlimpsePredictor, device: torch.device, dtype: torch.dtype) -> GlimpsePredictor:
    """The predictor on ``device`` in ``dtype``: a copy when it is elsewhere (the caller's
    module is never changed)."""
    weight = next(predictor.parameters())
    if weight.device == device and weight.dtype == dtype:
        return predictor
    return copy.deepcopy(predictor).to(device=device, dtype=dtype)


def _predictor_dtype(requested: torch.dtype | str | None, model: nn.Module) -> torch.dtype:
    if requested is None:
        return torch.float32
    if requested == "model":
        return next(model.parameters()).dtype
    if isinstance(requested, torch.dtype) and requested.is_floating_point:
        return requested
    raise ValueError(
        "glimpse_ops.hf.apply_glimpse_prune: predictor_dtype must be a floating torch.dtype or 'model', "
        f"got {requested!r}"
    )


@contextmanager
def pruned(model: nn.Module, **kwargs) -> Iterator[GlimpsePruneHandle]:
    """``apply_glimpse_prune`` for the duration of a ``with`` block."""
    handle = apply_glimpse_prune(model, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
