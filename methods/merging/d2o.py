"""KVMerger / D2O-style merging of evicted tokens (Wang et al. 2024, "Model Tells You Where to
Merge"; Wan et al. 2024, "D2O: Dynamic Discriminative Operations").

Selection is SnapKV's (observation-window votes, pooled). Instead of dropping an evicted
token, each is merged into its most similar kept token (cosine of keys) when that similarity
is at least ``threshold``: the kept key and value become a weighted average, weights the
tokens' window attention mass. Tokens below the threshold are dropped. The cache holds only
the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.eviction.base import group_mean
from methods.eviction.snapkv import SnapKV
from methods.registry import register


@register
@dataclass
class D2O(SnapKV):
    threshold: float = 0.5

    name: ClassVar[str] = "d2o"
    family: ClassVar[str] = "merging"
    paper: ClassVar[str] = "Wan et al. 2024, D2O; Wang et al. 2024, KVMerger"
    summary: ClassVar[str] = "SnapKV selection, evicted tokens merged into their nearest kept token"

    def validate(self) -> None:
        super().validate()
        require(
            -1.0 <= self.threshold <= 1.0,
            self.name,
            f"threshold must be in [-1, 1], got {self.threshold}",
        )

    def select(self, store, obs, head, budget):
        keep = super().select(store, obs, head, budget)
        n = obs.positions[head].numel()
        evicted = torch.ones(n, dtype=torch.bool, device=keep.device)
        evicted[keep] = False
        if not evicted.any():
            return keep
        keys, values = store.keys[head].float(), store.values[head].float()
        weight = group_mean(obs.window[head]).clamp_min(1e-6)
        unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ev = evicted.nonzero().squeeze(1)
        sim = unit[ev] @ unit[keep].T  # [E, K]
        best, target = sim.max(dim=1)
        ok = best >= self.threshold
        ev, target = ev[ok], keep[target[ok]]
        new_k, new_v = keys.clone(), values.clone()
        total = weight.clone()
        new_k.index_add_(0, target, keys[ev] * weight[ev, None])
        new_v.index_add_(0, target, values[ev] * weight[ev, None])
        new_k[keep] = new_k[keep] - keys[keep] + keys[keep] * weight[keep, None]
        new_v[keep] = new_v[keep] - values[keep] + values[keep] * weight[keep, None]
        total.index_add_(0, target, weight[ev])
        store.keys[head][keep] = (new_k[keep] / total[keep, None]).to(store.keys[head].dtype)
        store.values[head][keep] = (new_v[keep] / total[keep, None]).to(store.values[head].dtype)
        return keep
