"""EMS (Li et al., 2024, "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache
Compression Based on Global-Local Importance").

Importance is a Global-Local score: the accumulated attention from every prompt query
(global) is biased to early tokens by the causal mask, the attention from the last ``window``
queries (local) to recent ones, so EMS combines the two. kvlens reads the global part as the
accumulated attention divided by the number of queries that could see each token (which
removes the causal bias), normalises both parts to sum 1 over the head's tokens and adds
them, ``alpha * global + (1 - alpha) * local`` (``alpha`` a parameter; the paper's exact
weighting is not restated here). Query heads of a KV group are averaged.

Evict-then-merge, per KV head: the ``window`` newest tokens and the highest-scoring ones are
kept as they are; ``centres`` of the budget are merge slots, seeded by the best-scoring of
the tokens left over. Every other left-over token joins the centre its key is most similar to
(cosine); a token whose best similarity is under ``threshold`` falls in the zero class and is
evicted. Each centre becomes the score-weighted mean of its members' keys and values, so heads
whose evicted tokens are redundant merge them and heads that are sparse simply evict, the
head-wise adaptivity the paper describes. Compressed once after the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import Observation, require
from methods.eviction.base import EvictionMethod, group_mean, recent_mask
from methods.registry import register


def global_local_score(obs: Observation, head: int, alpha: float) -> torch.Tensor:
    """alpha * (causal-normalised accumulated attention) + (1 - alpha) * (window votes),
    each part summing to 1 over the head's stored tokens."""
    seen_by = (obs.n_seen - obs.positions[head]).clamp_min(1).float()
    glob = group_mean(obs.received[head]) / seen_by
    local = group_mean(obs.window[head])
    glob = glob / glob.sum().clamp_min(1e-30)
    local = local / local.sum().clamp_min(1e-30)
    return alpha * glob + (1 - alpha) * local


@register
@dataclass
class EMS(EvictionMethod):
    window: int = 32
    alpha: float = 0.5
    centres: float = 0.25
    threshold: float = 0.5

    name: ClassVar[str] = "ems"
    family: ClassVar[str] = "merging"
    paper: ClassVar[str] = (
        "Li et al. 2024, EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache "
        "Compression Based on Global-Local Importance"
    )
    summary: ClassVar[str] = (
        "Global-Local score keeps tokens; evicted ones merged into per-head centres, "
        "dissimilar ones (zero class) evicted"
    )
    decode_needs_attention: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        require(self.window >= 0, self.name, f"window must be >= 0, got {self.window}")
        require(
            self.window < self.budget,
            self.name,
            f"window ({self.window}) must be < budget ({self.budget})",
        )
        require(0.0 <= self.alpha <= 1.0, self.name, f"alpha must be in [0, 1], got {self.alpha}")
        require(
            0.0 <= self.centres < 1.0,
            self.name,
            f"centres must be a fraction of the budget in [0, 1), got {self.centres}",
        )
        require(
            -1.0 <= self.threshold <= 1.0,
            self.name,
            f"threshold must be in [-1, 1], got {self.threshold}",
        )

    def observation_window(self) -> int:
        return max(1, self.window)

    def n_centres(self) -> int:
        return min(int(self.centres * self.budget), self.budget - self.window)

    def protected(self, obs, head):
        return recent_mask(obs, head, self.window)

    def scores(self, store, obs, head):
        return global_local_score(obs, head, self.alpha)

    def select(self, store, obs, head, budget):
        n_centres = self.n_centres()
        score = self.scores(store, obs, head).float()
        ranked = score.clone()
        ranked[self.protected(obs, head)] = float("inf")
        order = torch.argsort(ranked, descending=True)
        keep, seeds, rest = (
            order[: budget - n_centres],
            order[budget - n_centres : budget],
            order[budget:],
        )
        if seeds.numel() and rest.numel():
            merge_into_centres(store, head, seeds, rest, score, self.threshold)
        return torch.cat([keep, seeds])


def merge_into_centres(
    store, head: int, seeds: torch.Tensor, rest: torch.Tensor, score: torch.Tensor, threshold
) -> torch.Tensor:
    """Merge each ``rest`` token into its most similar seed (key cosine >= ``threshold``; the
    others are the zero class, dropped); seeds become score-weighted means. Returns, per rest
    token, the seed row it joined (-1 for the zero class)."""
    keys, values = store.keys[head].float(), store.values[head].float()
    sim = F.normalize(keys[rest], dim=-1) @ F.normalize(keys[seeds], dim=-1).T
    best, which = sim.max(dim=1)
    joined = torch.where(best >= threshold, which, torch.full_like(which, -1))
    members = joined >= 0
    src, dst = rest[members], seeds[joined[members]]
    w = score.clamp_min(1e-12)
    total = w.clone().index_add_(0, dst, w[src])
    for x, buf in ((keys, store.keys[head]), (values, store.values[head])):
        acc = (x * w[:, None]).index_add_(0, dst, x[src] * w[src][:, None])
        buf[seeds] = (acc[seeds] / total[seeds][:, None]).to(buf.dtype)
    return joined
