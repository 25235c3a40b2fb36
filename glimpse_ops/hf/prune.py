"""``apply_glimpse_prune`` and the ``pruned`` context manager: GlimpsePrune on a Hugging Face
model instance, training-free (``prune_hooks``) or with a trained predictor
(``predictor_hooks``); the settings come from ``glimpseprune.PruneSettings.resolve``."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..glimpseprune import CAPS_PER, GlimpsePredictor, PruneSettings, load_predictor
from ._compat import require_transformers
from .adapters import adapter_for
from .attention import require_attention_kind
from .patch import ensure_unpatched
from .predictor_hooks import PredictorPruneHandle
from .prune_hooks import GlimpsePruneHandle, Selection
from .vit_taps import FAMILIES as VIT_TAP_FAMILIES

TRAINED_MODEL_TYPES = VIT_TAP_FAMILIES  # the ViT taps and their token order are known (vit_taps.py)


def apply_glimpse_prune(
    model: nn.Module,
    predictor=None,
    layer: int | None = None,
    threshold: float | None = None,
    max_keep_ratio: float | None = None,
    min_keep: int | None = None,
    *,
    max_remain_ratio: float | None = None,
    fixed_keep_ratio: float | None = None,
    caps_per: str | None = None,
    predictor_dtype: torch.dtype | str | None = None,
    selection: Selection | None = None,
    adapter: str | None = None,
) -> GlimpsePruneHandle:
    """Patch one model instance of a supported family (``SUPPORTED_MODEL_TYPES``: Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL, InternVL, LLaVA, LLaVA-NeXT, LLaVA-OneVision) to prune its visual
    tokens after decoder layer ``layer`` at every prefill. Returns a handle whose ``remove()``
    restores the model; ``handle.settings`` holds the layer and the keep rule.

    Training-free mode (``predictor=None``; ``layer`` defaults to about 2/3 of the depth,
    ``glimpseprune.default_layer``): the last prompt token's layer-K query is the glimpse;
    visual tokens are ranked by its head-averaged attention probabilities and the top
    ``ceil(max_keep_ratio * Nv)`` per sample are kept (the cap rounds up; default ratio 0.1;
    ``threshold`` on that probability keeps fewer; at least ``min_keep``, default 1).
    ``threshold=None`` with ``max_keep_ratio=1.0`` keeps every token.

    Trained mode (Qwen2.5-VL, Qwen3-VL, InternVL): ``predictor`` is a ``GlimpsePredictor``, a ``.safetensors``
    file written by ``GlimpsePredictor.save``, or a folder of the GlimpsePrune release
    (``config.json`` + ``new_modules_gp.pt``). The layer is the predictor's. The keep rule
    is the release's, per sample (``caps_per="sample"``, the default, as the release commit)
    or per image (``caps_per="image"``, as later versions): tokens with sigmoid(VIP) >
    ``threshold`` are kept, at most ``max(1, floor(max_remain_ratio * n))`` of them (the cap
    rounds down, as the release's ``max_remain_ratio``), at least ``min(min_keep, n)``; or,
    with ``fixed_keep_ratio`` r, exactly the top ``max(1, floor(r * n))``. Arguments not given
    take the predictor's values (the release's ``reduce_threshold`` 0.5, ``max_remain_ratio``
    none, ``min_remain_num`` 1, ``fixed_remain_ratio`` none). ``max_keep_ratio`` with a
    predictor is read as ``max_remain_ratio`` for this release, with a DeprecationWarning.
    ``predictor_dtype``: the dtype the glimpse rows and the VIP run in, default fp32 (see the
    README); ``"model"`` runs them in the model's dtype, as the release does.

    A GlimpsePrune+ release folder also holds a LoRA adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``) whose LLM the glimpse token and VIP were trained on: without
    it they lose accuracy (the official issue #7). ``adapter="merge"`` merges it into the
    model's weights in place (``remove()`` then takes the pruning out, not the merge);
    ``adapter="merged"`` says the model already holds it (e.g. a checkpoint written by
    ``python -m glimpse_ops.hf.gp_plus``); without either such a folder is refused.

    ``selection`` (training-free mode only) replaces how tokens are chosen and the caches
    compacted at layer K: a function of ``SelectionInputs`` returning (keys, values, index,
    scores); the default is ``glimpse_prune_selection`` (one ``glimpse_prune`` op).
    """
    where = "glimpse_ops.hf.apply_glimpse_prune"
    require_transformers()
    ensure_unpatched(model, "apply_glimpse_prune")
    release_adapter, adapter = adapter, adapter_for(model)  # (the argument names a LoRA; the local, the family's)
    attention = require_attention_kind(adapter.attn_implementation, where)
    config = None
    if predictor is not None:
        if selection is not None:
            raise ValueError(f"{where}: selection= applies to the training-free mode; with a predictor the VIP selects")
        if adapter.model_type not in TRAINED_MODEL_TYPES:
            raise TypeError(
                f"{where}: a trained predictor needs Qwen2.5-VL, Qwen3-VL or InternVL, got {adapter.model_type}"
            )
        if caps_per not in (None, *CAPS_PER):  # before the predictor's files are read
            raise ValueError(f"{where}: caps_per must be 'sample' or 'image', got {caps_per!r}")
        merge_from = _release_adapter(model, predictor, release_adapter, where)  # checked; merged below
        predictor = load_predictor(predictor, model, where, adapter_checked=True)
        config = predictor.config
    elif predictor_dtype is not None:
        raise ValueError(f"{where}: predictor_dtype applies with a predictor only")
    elif release_adapter is not None:
        raise ValueError(f"{where}: adapter= applies to a GlimpsePrune+ release given as predictor=")
    settings = PruneSettings.resolve(
        len(adapter.layers), config, where=where, layer=layer, threshold=threshold, max_keep_ratio=max_keep_ratio,
        max_remain_ratio=max_remain_ratio, min_keep=min_keep, fixed_keep_ratio=fixed_keep_ratio, caps_per=caps_per,
    )  # fmt: skip
    if predictor is None:
        handle: GlimpsePruneHandle = GlimpsePruneHandle(model, adapter, settings)
    else:
        placed = _placed(predictor, next(model.parameters()).device, _predictor_dtype(predictor_dtype, model))
        if merge_from is not None:  # everything else was checked: merge last
            from .lora import read_adapter

            read_adapter(model, merge_from).merge()
            model.__dict__.setdefault(MERGED_ATTR, []).append(str(merge_from.resolve()))
        handle = PredictorPruneHandle(model, adapter, settings, predictor=placed)
    handle.attention = attention
    if selection is not None:
        handle.selection = selection
    handle.claim("apply_glimpse_prune")
    handle.attach()
    return handle


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MERGED_ATTR = "_glimpse_ops_merged_adapters"  # on the model: the release folders merged into it


def _release_adapter(model: nn.Module, predictor, adapter: str | None, where: str) -> Path | None:
    """A GlimpsePrune+ release's LoRA adapter: the folder to merge (``adapter="merge"``), None
    when taken as already merged (``"merged"``) or when there is none; a refusal naming the trap
    otherwise, or when this model already had this folder's adapter merged."""
    if adapter not in (None, "merge", "merged"):
        raise ValueError(f"{where}: adapter must be None, 'merge' or 'merged', got {adapter!r}")
    folder = Path(predictor) if isinstance(predictor, (str, Path)) else None
    present = [name for name in ADAPTER_FILES if folder is not None and (folder / name).is_file()]
    if not present:
        if adapter == "merge":
            raise ValueError(f"{where}: adapter='merge' but {predictor!r} holds no {' + '.join(ADAPTER_FILES)}")
        return None
    if len(present) < len(ADAPTER_FILES):
        missing = [name for name in ADAPTER_FILES if name not in present]
        raise FileNotFoundError(f"{where}: the GlimpsePrune+ release {folder} has {present[0]} but no {missing[0]}")
    if adapter is None:
        raise ValueError(
            f"{where}: {folder} is a GlimpsePrune+ release: its glimpse token and VIP were trained on the LLM with "
            "the LoRA adapter in the same folder merged, and without it they lose accuracy (the official code's "
            "issue #7: GQA 0.599 instead of 0.722). Pass adapter='merge' to merge it into this model's weights "
            "(in place), or adapter='merged' for a model that already holds it"
        )
    if adapter == "merged":
        return None
    if str(folder.resolve()) in model.__dict__.get(MERGED_ATTR, []):
        raise ValueError(
            f"{where}: the adapter of {folder} was already merged into this model (by an earlier adapter='merge'; "
            "remove() does not unmerge): pass adapter='merged', a second merge would add it twice"
        )
    return folder


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
