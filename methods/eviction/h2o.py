"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference").

Each token's score is the attention it has accumulated from every query so far (prompt
queries at prefill, then each generated token); keep the ``recent`` newest tokens and fill
the rest of the budget with the highest accumulated scores. The group's query heads are
averaged into one score per KV head.

Choices that are parameters (defaults follow the paper):
- ``normalise``: ``sum`` ranks by the accumulated attention itself (H2O); ``mean`` divides it
  by the number of queries that could see the token, so early tokens are not favoured just for
  having been seen longer (kvpress's ObservedAttentionPress).
- ``schedule``: ``continuous`` evicts at every step (H2O); ``prefill`` compresses once.
- ``recent``: -1 keeps half the budget as the recent window (H2O); 0 keeps none (kvpress).
``h2o:recent=0,normalise=mean,schedule=prefill`` is kvpress's ObservedAttentionPress.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.base import require
from methods.eviction.base import RecentWindowEviction, group_mean
from methods.registry import register

NORMALISATIONS = ("sum", "mean")


@register
@dataclass
class H2O(RecentWindowEviction):
    normalise: str = "sum"

    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle"
    summary: ClassVar[str] = (
        "accumulated attention + a recent window (normalise: sum = paper | mean = kvpress; "
        "schedule: continuous = paper | prefill = kvpress)"
    )

    def validate(self) -> None:
        super().validate()
        require(
            self.normalise in NORMALISATIONS,
            self.name,
            f"normalise must be {' or '.join(NORMALISATIONS)}, not '{self.normalise}'",
        )

    def observe(self, store, obs):
        acc = store.aux_state("h2o_score")
        for h, received in enumerate(obs.received):
            acc[h] += group_mean(received)

    def scores(self, store, obs, head):
        acc = store.aux["h2o_score"][head]
        if self.normalise == "sum":
            return acc
        # every query from a token's own position on saw it (kept tokens were never evicted)
        seen_by = (obs.n_seen - obs.positions[head]).clamp_min(1)
        return acc / seen_by.float()
