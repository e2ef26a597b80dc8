"""KVCrush (Jha et al., 2025, "KVCrush: Key value cache size-reduction using similarity in
head-behaviour").

An importance method (here SnapKV's pooled window votes) keeps ``1 - crush`` of the budget;
KVCrush spends the rest on representatives of the tokens it would evict, so that no kind of
token vanishes altogether. Each token is represented by a binary vector over the layer's
query heads: bit h is 1 when head h ranks the token in the top half of its own window votes
(the token "matters" to that head). Tokens with similar head behaviour carry similar
information, so the evicted tokens are ordered by the Hamming distance of their vector to an
anchor vector, cut into equal groups along that order, and one token per group is kept (the
first of each group: evenly spaced picks along the sorted order, as in OpenVINO GenAI's
implementation). The anchor is ``random`` (seeded), ``mean`` (the majority bit per head over
the layer's tokens) or ``alternate`` (0101...), the paper's options. Compressed once after the
prefill; a KV head's group of query heads shares its kept set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.eviction.snapkv import SnapKV
from methods.registry import register

ANCHORS = ("random", "mean", "alternate")


def head_behaviour(votes: torch.Tensor) -> torch.Tensor:
    """[H, L] attention votes per query head -> bool [L, H]: token in the top half of head h."""
    n = votes.shape[1]
    top = torch.topk(votes.float(), max(1, n // 2), dim=1).indices
    bits = torch.zeros_like(votes, dtype=torch.bool)
    bits.scatter_(1, top, True)
    return bits.T


def anchor_bits(bits: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """The anchor [H] the Hamming distances are measured from."""
    n_heads = bits.shape[1]
    if kind == "mean":
        return bits.float().mean(0) > 0.5
    if kind == "alternate":
        return torch.arange(n_heads, device=bits.device) % 2 == 1
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(n_heads, generator=g) < 0.5).to(bits.device)


def representatives(bits: torch.Tensor, anchor: torch.Tensor, candidates: torch.Tensor, k: int):
    """``k`` of ``candidates`` (token rows of ``bits``), one per group of equal size along the
    order of Hamming distance to ``anchor`` (ties broken by position)."""
    if k <= 0 or candidates.numel() == 0:
        return candidates[:0]
    dist = (bits[candidates] != anchor[None, :]).sum(1)
    order = candidates[torch.argsort(dist * (candidates.max() + 1) + candidates)]
    k = min(k, order.numel())
    step = order.numel() // k
    return order[torch.arange(k, device=order.device) * step]


@register
@dataclass
class KVCrush(SnapKV):
    crush: float = 0.25
    anchor: str = "random"
    seed: int = 0

    name: ClassVar[str] = "kvcrush"
    paper: ClassVar[str] = (
        "Jha et al. 2025, KVCrush: Key value cache size-reduction using similarity in "
        "head-behaviour"
    )
    summary: ClassVar[str] = (
        "SnapKV keeps most of the budget; the rest keeps one representative per group of "
        "evicted tokens with similar head-behaviour bits"
    )

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.crush < 1.0, self.name, f"crush must be in [0, 1), got {self.crush}")
        require(
            self.anchor in ANCHORS,
            self.name,
            f"anchor must be {', '.join(ANCHORS)}, not '{self.anchor}'",
        )
        require(
            self.window <= self.budget - int(self.crush * self.budget),
            self.name,
            f"window ({self.window}) must fit in the importance share of the budget "
            f"({self.budget - int(self.crush * self.budget)})",
        )

    def select(self, store, obs, head, budget):
        n_crush = int(self.crush * budget)
        keep = super().select(store, obs, head, budget - n_crush)
        evicted = torch.ones(obs.positions[head].numel(), dtype=torch.bool, device=keep.device)
        evicted[keep] = False
        votes = torch.cat([w.float() for w in obs.window])  # every query head of the layer
        bits = head_behaviour(votes)
        anchor = anchor_bits(bits, self.anchor, self.seed + obs.layer)
        reps = representatives(bits, anchor, evicted.nonzero().squeeze(1), n_crush)
        return torch.cat([keep, reps])
