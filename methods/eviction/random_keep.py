"""Random baseline: after prefill keep ``budget`` prompt tokens chosen uniformly at random.

Seeded by (seed, layer, head), so a run is repeatable. Tokens generated later are kept, as
for SnapKV, so the two compare at equal prefill budgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.eviction.base import EvictionMethod
from methods.registry import register


@register
@dataclass
class RandomKeep(EvictionMethod):
    seed: int = 0

    name: ClassVar[str] = "random"
    paper: ClassVar[str] = "baseline (uniform random eviction)"
    summary: ClassVar[str] = "`budget` prompt tokens chosen at random"
    decode_needs_attention: ClassVar[bool] = False

    def scores(self, store, obs, head):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + obs.layer * 1009 + head)
        return torch.rand(obs.positions[head].numel(), generator=gen).to(obs.positions[head].device)
