"""GlimpsePrune's two keep rules, shared by the HF hooks, the vLLM plugin and the reference
LVLM so that all of them keep the same tokens.

* ``TrainingFreeRule`` (no predictor): the top ``ceil(max_keep_ratio * Nv)`` visual tokens by
  the glimpse's head-averaged probability (the cap rounds up), fewer with a ``threshold`` on
  that probability, at least ``min_keep``.
* ``TrainedKeepRule`` (the release's, over sigmoid(VIP)), per sample (``caps_per="sample"``,
  as the release commit) or per image (``"image"``, as later versions of the release): with
  ``fixed_keep_ratio`` r the top ``max(1, floor(r * n))`` tokens; else ``sigmoid > threshold``,
  at most ``max(1, floor(max_remain_ratio * n))`` of them (the cap rounds down, as the
  release's ``max_remain_ratio``), at least ``min(min_keep, n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops import select_tokens

CAPS_PER = ("sample", "image")


def ceil_caps(n_visual: Tensor, max_keep_ratio: float | None, min_keep: int) -> Tensor | None:
    """int64 like ``n_visual``: the training-free cap, at most ceil(max_keep_ratio * Nv) visual
    tokens per row (the cap rounds up) and at least min(1, min_keep); None without a ratio."""
    if max_keep_ratio is None:
        return None
    return torch.ceil(n_visual.double() * max_keep_ratio).long().clamp(min=min(1, min_keep))


@dataclass(frozen=True)
class TrainingFreeRule:
    """The training-free rule: a ``threshold`` on the head-averaged glimpse probability (None:
    no threshold), the ``ceil_caps`` cap (None: no cap), at least ``min_keep``."""

    threshold: float | None
    max_keep_ratio: float | None
    min_keep: int

    def caps(self, n_visual: Tensor) -> Tensor | None:
        """int64 like ``n_visual`` (visual tokens per row), or None without a cap."""
        return ceil_caps(n_visual, self.max_keep_ratio, self.min_keep)


@dataclass(frozen=True)
class TrainedKeepRule:
    """The release's rule over the VIP's keep probabilities (module docstring); built by
    ``PruneSettings.resolve``, which takes the predictor's defaults for what is not given."""

    threshold: float | None
    max_remain_ratio: float | None
    min_keep: int
    fixed_keep_ratio: float | None = None
    caps_per: str = "sample"

    def limits(self, n_tokens: Tensor, dtype: torch.dtype) -> tuple[float | None, Tensor, int]:
        """(threshold, max_keep int64 per row, min_keep) of ``select_tokens`` for rows of
        ``n_tokens`` visual tokens, with probabilities computed in ``dtype`` (the predictor's)."""
        n = n_tokens.double()
        if self.fixed_keep_ratio is not None:
            return None, torch.floor(n * self.fixed_keep_ratio).long().clamp(min=1), 0
        caps = torch.zeros_like(n_tokens)  # 0: no cap
        if self.max_remain_ratio is not None:
            caps = torch.floor(n * self.max_remain_ratio).long().clamp(min=1)
        threshold = self.threshold
        if threshold is not None and dtype != torch.float32:
            # the release compares probabilities in its dtype: the threshold rounds to it too
            threshold = float(torch.tensor(threshold, dtype=dtype))
        return threshold, caps, self.min_keep

    def keep(self, probs: Tensor, visual: Tensor, image_sizes: list[int], dtype: torch.dtype) -> Tensor:
        """bool [B, S]: which tokens stay. ``probs`` fp32 [N]: keep probabilities of the visual
        tokens in prompt order (``visual`` bool [B, S] marks them, N = visual.sum()), whose
        images hold ``image_sizes`` tokens each, in order. Every non-visual token stays."""
        if self.caps_per == "sample":
            scores = torch.zeros(visual.shape, dtype=probs.dtype, device=probs.device)
            scores[visual] = probs
            threshold, caps, min_keep = self.limits(visual.sum(dim=1), dtype)
            return select_tokens(scores, visual, threshold=threshold, max_keep=caps, min_keep=min_keep)
        rows = nn.utils.rnn.pad_sequence(list(probs.split(image_sizes)), batch_first=True)  # [I, n_max]
        in_image = nn.utils.rnn.pad_sequence(
            [torch.ones(n, dtype=torch.bool, device=probs.device) for n in image_sizes], batch_first=True
        )
        threshold, caps, min_keep = self.limits(torch.tensor(image_sizes, device=probs.device), dtype)
        kept = select_tokens(rows, in_image, threshold=threshold, max_keep=caps, min_keep=min_keep)
        keep = ~visual
        keep[visual] = kept[in_image]
        return keep
