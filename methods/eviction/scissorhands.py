"""Scissorhands (Liu et al., 2023, "Scissorhands: Exploiting the Persistence of Importance
Hypothesis for LLM KV Cache Compression at Test Time").

Tokens that were important stay important. Over a history of queries (the last
``history`` prompt queries at prefill, then every generated token), count for each token
how often its attention was below the uniform share 1/(visible tokens); evict the tokens
with the most such low-attention counts, keeping the ``recent`` newest. The paper
compresses in blocks when the cache fills; kvlens evicts at every step (a block of one) with
``schedule=continuous`` (the default), or only once after prefill with ``schedule=prefill``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.eviction.base import RecentWindowEviction, group_mean
from methods.registry import register


@register
@dataclass
class Scissorhands(RecentWindowEviction):
    history: int = 32

    name: ClassVar[str] = "scissorhands"
    paper: ClassVar[str] = "Liu et al. 2023, Scissorhands: Persistence of Importance"
    summary: ClassVar[str] = "evict tokens most often below average attention in a history"

    def validate(self) -> None:
        super().validate()
        require(self.history >= 1, self.name, f"history must be >= 1, got {self.history}")

    def observation_window(self) -> int:
        return self.history

    def observe(self, store, obs):
        low = store.aux_state("low_count")
        for h in range(len(obs.positions)):
            logits = obs.window_logits(h)  # [G, W, L]
            probs = torch.softmax(logits, dim=-1)
            visible = torch.isfinite(logits).sum(-1, keepdim=True).clamp_min(1)
            below = (probs < 1.0 / visible) & torch.isfinite(logits)
            low[h] += below.float().sum(1).mean(0)

    def scores(self, store, obs, head):
        # fewer low-attention votes keeps; current attention breaks ties
        return -store.aux["low_count"][head] + 1e-3 * group_mean(obs.last[head])
