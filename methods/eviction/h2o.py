"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference").

Each token's score is the attention it has accumulated from every query so far (prompt
queries at prefill, then each generated token); keep the ``recent`` newest tokens and fill
the rest of the budget with the highest accumulated scores, evicting at every step. The
group's query heads are averaged into one score per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.eviction.base import RecentWindowEviction, group_mean
from methods.registry import register


@register
@dataclass
class H2O(RecentWindowEviction):  # recent -1 = half the budget, as in the paper
    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle"
    summary: ClassVar[str] = "accumulated attention + a recent window, evicting while decoding"
    evict_while_decoding: ClassVar[bool] = True

    def observe(self, store, obs):
        acc = store.aux_state("h2o_score")
        for h, received in enumerate(obs.received):
            acc[h] += group_mean(received)

    def scores(self, store, obs, head):
        return store.aux["h2o_score"][head]
