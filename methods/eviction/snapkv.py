"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

After prefill, the last ``window`` prompt queries (the observation window) vote: each
prompt token's score is the attention mass those queries give it, averaged over the
group's query heads and smoothed by a 1-D pooling of width ``kernel`` over the tokens before
the window, so that neighbours of a strong token survive with it. Keep the window itself
plus the top-scoring tokens up to ``budget``; tokens generated later are all kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import Observation, require
from methods.eviction.base import EvictionMethod, group_mean, recent_mask
from methods.registry import register


def pooled_window_score(
    obs: Observation, head: int, kernel: int, pooling: str, window: int
) -> torch.Tensor:
    """Group-mean window votes [L], pooled over the tokens before the window (SnapKV pools the
    prefix only: the window's own votes, kept anyway, do not spill onto its neighbours)."""
    score = group_mean(obs.window[head])
    if kernel > 1:
        inside = recent_mask(obs, head, window)
        pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
        outside = score.masked_fill(inside, 0.0)[None, None]  # votes are >= 0: 0 pads both
        score = torch.where(inside, score, pool(outside, kernel, 1, kernel // 2)[0, 0])
    return score


@register
@dataclass
class SnapKV(EvictionMethod):
    window: int = 32
    kernel: int = 7
    pooling: str = "max"

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = (
        "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation"
    )
    summary: ClassVar[str] = "observation-window votes, pooled, at prefill"
    decode_needs_attention: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        require(self.window >= 1, self.name, f"window must be >= 1, got {self.window}")
        require(
            self.kernel >= 1 and self.kernel % 2 == 1,
            self.name,
            f"kernel must be odd and >= 1, got {self.kernel}",
        )
        require(
            self.pooling in ("max", "avg"),
            self.name,
            f"pooling must be max or avg, not '{self.pooling}'",
        )

    def observation_window(self) -> int:
        return self.window

    def protected(self, obs, head):
        return recent_mask(obs, head, self.window)

    def scores(self, store, obs, head):
        return pooled_window_score(obs, head, self.kernel, self.pooling, self.window)
