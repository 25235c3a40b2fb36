"""The keep rule of GlimpsePrune with a trained predictor (the release's), shared by the HF
hooks (``predictor_hooks.py``) and the vLLM plugin so that both keep the same tokens.

Per sample (``caps_per="sample"``, as the release commit) or per image (``"image"``, as later
versions of the release): with ``fixed_keep_ratio`` r the top ``max(1, floor(r * n))``
tokens; else ``sigmoid > threshold``, at most ``max(1, floor(max_keep_ratio * n))`` of them
(the cap rounds down), at least ``min(min_keep, n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import select_tokens
from .predictor import PredictorConfig

CAPS_PER = ("sample", "image")


@dataclass(frozen=True)
class TrainedKeepRule:
    threshold: float | None
    max_keep_ratio: float | None
    min_keep: int
    fixed_keep_ratio: float | None = None
    caps_per: str = "sample"

    @classmethod
    def resolve(
        cls,
        config: PredictorConfig,
        *,
        threshold: float | None = None,
        max_keep_ratio: float | None = None,
        min_keep: int | None = None,
        fixed_keep_ratio: float | None = None,
        caps_per: str | None = None,
        where: str,
    ) -> TrainedKeepRule:
        """The rule from the caller's arguments, the ones not given taken from the predictor's
        config (the release's ``reduce_threshold``, ``max_remain_ratio``, ``min_remain_num``,
        ``fixed_remain_ratio``); ``where`` names the caller in errors."""
        for name, ratio in (("max_keep_ratio", max_keep_ratio), ("fixed_keep_ratio", fixed_keep_ratio)):
            if ratio is not None and not 0 < ratio <= 1:
                raise ValueError(f"{where}: {name} must be in (0, 1], got {ratio}")
        if min_keep is not None and (not isinstance(min_keep, int) or min_keep < 0):
            raise ValueError(f"{where}: min_keep must be an int >= 0, got {min_keep!r}")
        if caps_per not in (None, *CAPS_PER):
            raise ValueError(f"{where}: caps_per must be 'sample' or 'image', got {caps_per!r}")
        if fixed_keep_ratio is not None and (threshold is not None or max_keep_ratio is not None):
            raise ValueError(f"{where}: fixed_keep_ratio keeps a fixed share; it takes no threshold or max_keep_ratio")
        if fixed_keep_ratio is None and threshold is None and max_keep_ratio is None:
            fixed_keep_ratio = config.fixed_remain_ratio
        return cls(
            threshold=config.reduce_threshold if threshold is None else threshold,
            max_keep_ratio=config.max_remain_ratio if max_keep_ratio is None else max_keep_ratio,
            min_keep=config.min_remain_num if min_keep is None else min_keep,
            fixed_keep_ratio=fixed_keep_ratio,
            caps_per=caps_per or "sample",
        )

    def limits(self, n_tokens: Tensor, dtype: torch.dtype) -> tuple[float | None, Tensor, int]:
        """(threshold, max_keep int64 per row, min_keep) of ``select_tokens`` for rows of
        ``n_tokens`` visual tokens, with probabilities computed in ``dtype`` (the predictor's)."""
        n = n_tokens.double()
        if self.fixed_keep_ratio is not None:
            return None, torch.floor(n * self.fixed_keep_ratio).long().clamp(min=1), 0
        caps = torch.zeros_like(n_tokens)  # 0: no cap
        if self.max_keep_ratio is not None:
            caps = torch.floor(n * self.max_keep_ratio).long().clamp(min=1)
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
