"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling").

SnapKV's selection with budgets that shrink with depth: lower layers spread attention
widely and get more tokens, upper layers concentrate and get fewer. Budgets form an
arithmetic sequence from ``2*budget - budget/beta`` at layer 0 to ``budget/beta`` at the
last layer, so the mean over layers is ``budget``. As in the paper's code (KVCache-Factory),
layer 0 never gets more than the prompt outside the window (the top is capped there and the
bottom raised to keep the mean), and when the pyramid would leave a layer less than its
window the budget is uniform (SnapKV). When the prompt is no longer than ``budget``, every
layer keeps everything (the pyramid would only take tokens away).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.base import require
from methods.eviction.snapkv import SnapKV
from methods.registry import register


@register
@dataclass
class PyramidKV(SnapKV):
    beta: float = 20.0

    name: ClassVar[str] = "pyramidkv"
    paper: ClassVar[str] = "Cai et al. 2024, PyramidKV: Pyramidal Information Funneling"
    summary: ClassVar[str] = "SnapKV with budgets decreasing by depth"

    def validate(self) -> None:
        super().validate()
        require(self.beta >= 1, self.name, f"beta must be >= 1, got {self.beta}")

    def layer_budget(self, layer: int, n_layers: int, n_tokens: int) -> int:
        low = self.budget / self.beta
        high = 2 * self.budget - low
        if high >= n_tokens - self.window:
            high = n_tokens - self.window
            low = 2 * self.budget - high
        if not n_tokens >= high >= low >= self.window:
            return self.budget
        frac = layer / max(1, n_layers - 1)
        return max(1, round(high - (high - low) * frac))

    def head_budgets(self, obs):
        held = max(p.numel() for p in obs.positions)
        if held <= self.budget:  # the mean budget covers the prompt: nothing to funnel
            return [held] * len(obs.positions)
        return [self.layer_budget(obs.layer, obs.n_layers, held)] * len(obs.positions)
