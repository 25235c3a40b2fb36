"""GlimpsePrune's settings, resolved once for every integration: the layer K and the keep rule
from what a caller gave, the predictor's config (trained mode) and the model's depth.

``glimpse_ops.hf.apply_glimpse_prune``, the vLLM plugin (``engine_kwargs`` -> ``hf_overrides``
-> every vLLM process) and the training command call ``PruneSettings.resolve`` or
``default_layer``; nothing else chooses a layer, checks a ratio or fills in a default.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from .keep_rule import CAPS_PER, TrainedKeepRule, TrainingFreeRule
from .predictor import PredictorConfig

DEFAULT_MAX_KEEP_RATIO = 0.1  # training-free, when neither a ratio nor a threshold is given
DEFAULT_MIN_KEEP = 1  # training-free


def default_layer(n_layers: int) -> int:
    """GlimpsePrune's default layer K, about 2/3 of the depth: ``ceil(2 n / 3) - 1`` (18 of 28
    layers for Qwen2.5-VL-7B, 21 of 32)."""
    return max(0, math.ceil(2 * n_layers / 3) - 1)


@dataclass(frozen=True)
class PruneSettings:
    """Where to prune (``layer`` K: scores read and caches compacted after this decoder layer)
    and what to keep (``rule``: ``TrainingFreeRule`` without a predictor, the release's
    ``TrainedKeepRule`` with one)."""

    layer: int
    rule: TrainingFreeRule | TrainedKeepRule

    @property
    def trained(self) -> bool:
        return isinstance(self.rule, TrainedKeepRule)

    @classmethod
    def resolve(
        cls,
        n_layers: int,
        predictor: PredictorConfig | None = None,
        *,
        where: str,
        name_prefix: str = "",
        layer: int | None = None,
        threshold: float | None = None,
        max_keep_ratio: float | None = None,
        max_remain_ratio: float | None = None,
        min_keep: int | None = None,
        fixed_keep_ratio: float | None = None,
        caps_per: str | None = None,
    ) -> PruneSettings:
        """The settings from the caller's arguments (None: not given), checked, with the
        defaults filled in: training-free ``max_keep_ratio`` 0.1 when no ``threshold`` is
        given, ``min_keep`` 1; trained, the predictor's own (the release's ``reduce_threshold``,
        ``max_remain_ratio``, ``min_remain_num``, ``fixed_remain_ratio``) and its layer.
        Errors name ``where`` and each argument as ``name_prefix + name`` (vLLM: ``glimpse_``).

        ``max_keep_ratio`` is the training-free cap (it rounds up); with a predictor the cap is
        ``max_remain_ratio`` (it rounds down, as the release's); ``max_keep_ratio`` given with a
        predictor still means ``max_remain_ratio`` for this release, with a DeprecationWarning."""
        p = name_prefix

        def fail(message: str) -> ValueError:
            return ValueError(f"{where}: {message}")

        ratios = (("max_keep_ratio", max_keep_ratio), ("max_remain_ratio", max_remain_ratio),
                  ("fixed_keep_ratio", fixed_keep_ratio))  # fmt: skip
        for name, ratio in ratios:
            if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
                raise fail(f"{p}{name} must be in (0, 1], got {ratio!r}")
        if min_keep is not None and (not isinstance(min_keep, int) or min_keep < 0):
            raise fail(f"{p}min_keep must be an int >= 0, got {min_keep!r}")
        if layer is not None and not isinstance(layer, int):
            raise fail(f"{p}layer must be in [0, {n_layers - 1}), got {layer!r}")
        if predictor is None:
            for name, value in (("max_remain_ratio", max_remain_ratio), ("fixed_keep_ratio", fixed_keep_ratio),
                                ("caps_per", caps_per)):  # fmt: skip
                if value is not None:
                    raise fail(f"{p}{name} applies with a predictor only")
            if threshold is None and max_keep_ratio is None:
                max_keep_ratio = DEFAULT_MAX_KEEP_RATIO
            rule: TrainingFreeRule | TrainedKeepRule = TrainingFreeRule(
                threshold, max_keep_ratio, DEFAULT_MIN_KEEP if min_keep is None else min_keep
            )
            layer = default_layer(n_layers) if layer is None else layer
        else:
            if max_keep_ratio is not None:
                if max_remain_ratio is not None:
                    raise fail(f"{p}max_keep_ratio and {p}max_remain_ratio name the same cap with a predictor")
                warnings.warn(
                    f"{where}: with a predictor the cap is {p}max_remain_ratio (it rounds down, as the release's); "
                    f"{p}max_keep_ratio (the training-free cap, which rounds up) is read as {p}max_remain_ratio "
                    "for this release only",
                    DeprecationWarning,
                    stacklevel=3,
                )
                max_remain_ratio = max_keep_ratio
            if caps_per not in (None, *CAPS_PER):
                raise fail(f"{p}caps_per must be 'sample' or 'image', got {caps_per!r}")
            if fixed_keep_ratio is not None and (threshold is not None or max_remain_ratio is not None):
                raise fail(f"{p}fixed_keep_ratio keeps a fixed share; it takes no threshold or max_remain_ratio")
            if layer is not None and layer != predictor.score_layer:
                raise fail(f"the predictor was trained for layer {predictor.score_layer}, got {p}layer={layer}")
            if fixed_keep_ratio is None and threshold is None and max_remain_ratio is None:
                fixed_keep_ratio = predictor.fixed_remain_ratio
            rule = TrainedKeepRule(
                threshold=predictor.reduce_threshold if threshold is None else threshold,
                max_remain_ratio=predictor.max_remain_ratio if max_remain_ratio is None else max_remain_ratio,
                min_keep=predictor.min_remain_num if min_keep is None else min_keep,
                fixed_keep_ratio=fixed_keep_ratio,
                caps_per=caps_per or "sample",
            )
            layer = predictor.score_layer
        if not 0 <= layer < n_layers - 1:
            raise fail(f"{p}layer must be in [0, {n_layers - 1}), got {layer!r}")
        return cls(layer, rule)
