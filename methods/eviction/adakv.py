"""Ada-KV-style adaptive head budgets (Feng et al., 2024, "Ada-KV: Optimizing KV Cache
Eviction by Adaptive Budget Allocation") on top of SnapKV's scores.

A layer's total budget (``budget`` x KV heads) is shared: heads whose attention is spread
out get more tokens, focused heads fewer. Every head keeps its observation window and is
guaranteed its top ``floor`` x ``budget`` tokens (Ada-KV's safeguard); the rest of the
layer's budget goes to the highest pooled window scores across all heads, compared as they
are (each head's votes are attention weights, already on one scale, as in Ada-KV's code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.eviction.snapkv import SnapKV, pooled_window_score
from methods.registry import register


@register
@dataclass
class AdaKV(SnapKV):
    floor: float = 0.2

    name: ClassVar[str] = "adakv"
    paper: ClassVar[str] = "Feng et al. 2024, Ada-KV: Adaptive Budget Allocation"
    summary: ClassVar[str] = "SnapKV with per-head budgets shared across a layer"

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.floor <= 1.0, self.name, f"floor must be in [0, 1], got {self.floor}")

    def head_budgets(self, obs):
        n_heads = len(obs.positions)
        lengths = [p.numel() for p in obs.positions]
        total = self.budget * n_heads
        if sum(lengths) <= total:
            return lengths
        safe = max(1, int(self.floor * self.budget)) if self.floor > 0 else 0
        guaranteed = [min(n, safe) for n in lengths]
        extra_scores, owners = [], []
        for h in range(n_heads):
            s = pooled_window_score(obs, h, self.kernel, self.pooling, self.window).clone()
            s[self.protected(obs, h)] = float("inf")  # the window is kept by every head
            rest = torch.sort(s, descending=True).values[guaranteed[h] :]
            extra_scores.append(rest)
            owners.append(torch.full_like(rest, h, dtype=torch.long))
        scores, owner = torch.cat(extra_scores), torch.cat(owners)
        n_extra = min(total - sum(guaranteed), scores.numel())
        chosen = owner[torch.topk(scores, n_extra).indices]
        counts = torch.bincount(chosen, minlength=n_heads).tolist()
        return [guaranteed[h] + counts[h] for h in range(n_heads)]
