"""Task-KV-style budgets by head type (He et al., 2025, "Task-KV: Task-aware KV Cache
Optimization via Semantic Differentiation of Attention Heads").

Heads whose output lies far from the layer's semantic centre (heterogeneous heads) carry
the information the task needs and keep their whole cache; the others aggregate and keep
only attention sinks, a recent window and a few "middle activations". Which heads are
heterogeneous is decided per prompt, at prefill: a query head's semantic vector is the mean
attention output of the last ``window`` prompt queries, the centre is the mean of the
layer's vectors, and the ``heads`` fraction of the layer's KV heads farthest from it (L2; a
KV head as far as the farthest of its query heads) is heterogeneous. ``scope=model`` ranks
every KV head of the model instead (distances divided by their layer's mean, decided once
the last layer has prefilled), so that fewer than one head per layer can stay whole (with 3
KV heads a layer, one whole head is already a third of the cache). An ordinary KV head keeps
``budget`` tokens: the first ``sinks``, the ``recent`` newest and, for the rest, the tokens
with most attention from the window (the middle activations). Compressed once after prefill.

The paper's middle activations summarise what the evicted middle held; kvlens keeps the
middle tokens the window attends to most instead, stated here as the one difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Observation, require
from methods.eviction.base import EvictionMethod, group_mean, recent_mask
from methods.registry import register

SCOPES = ("layer", "model")


@register
@dataclass
class TaskKV(EvictionMethod):
    heads: float = 0.34
    sinks: int = 4
    recent: int = 32
    window: int = 16
    scope: str = "layer"

    name: ClassVar[str] = "taskkv"
    family: ClassVar[str] = "head-aware"
    paper: ClassVar[str] = (
        "He et al. 2025, Task-KV: Task-aware KV Cache Optimization via Semantic "
        "Differentiation of Attention Heads"
    )
    summary: ClassVar[str] = (
        "heads far from the layer's semantic centre keep all; the others sinks + recent + "
        "the middle tokens the window attends to most"
    )
    decode_needs_attention: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        require(0.0 <= self.heads <= 1.0, self.name, f"heads must be in [0, 1], got {self.heads}")
        require(self.sinks >= 0, self.name, f"sinks must be >= 0, got {self.sinks}")
        require(self.recent >= 0, self.name, f"recent must be >= 0, got {self.recent}")
        require(self.window >= 1, self.name, f"window must be >= 1, got {self.window}")
        require(
            self.scope in SCOPES,
            self.name,
            f"scope must be {' or '.join(SCOPES)}, not '{self.scope}'",
        )
        require(
            self.sinks + self.recent <= self.budget,
            self.name,
            f"sinks + recent ({self.sinks + self.recent}) must be <= budget ({self.budget})",
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pending: list = []  # (store, distances, ordinary heads' kept index) per layer

    def observation_window(self) -> int:
        return self.window

    def distances(self, store, obs: Observation) -> torch.Tensor:
        """[Hkv]: each KV head's distance from the layer's semantic centre (the farthest of
        its query heads), divided by the layer's mean so that layers compare."""
        values = store.values
        vectors = []
        for h in range(len(obs.positions)):
            p = torch.softmax(obs.window_logits(h), dim=-1)  # [G, W, L_h]
            vectors.append((p @ values[h].float()).mean(1))  # [G, D]
        vec = torch.stack(vectors)  # [Hkv, G, D]
        dist = (vec - vec.flatten(0, 1).mean(0)).norm(dim=-1)  # [Hkv, G]
        return dist.amax(1) / dist.mean().clamp_min(1e-30)

    def compress(self, store, obs: Observation) -> None:
        if not obs.prefill:
            return
        ordinary = [
            None if p.numel() <= self.budget else self.select(store, obs, h, self.budget)
            for h, p in enumerate(obs.positions)
        ]
        self._pending.append((store, self.distances(store, obs), ordinary))
        if self.scope == "layer" or obs.layer == obs.n_layers - 1:
            self._decide()

    def _decide(self) -> None:
        """Keep the farthest ``heads`` fraction of the pending KV heads whole; evict the rest."""
        far = torch.cat([d for _s, d, _o in self._pending])
        n_far = round(self.heads * far.numel())
        chosen = set(torch.topk(far, n_far).indices.tolist()) if n_far else set()
        flags, i = [], 0
        for store, _dist, ordinary in self._pending:
            flags.append([])
            for h, keep in enumerate(ordinary):
                flags[-1].append(i in chosen)
                if i not in chosen and keep is not None:
                    store.keep(h, keep)
                i += 1
            store.shrink()
        self.last_heterogeneous = flags[-1] if self.scope == "layer" else flags
        self._pending = []

    def protected(self, obs, head):
        return recent_mask(obs, head, self.recent, self.sinks)

    def scores(self, store, obs, head):
        return group_mean(obs.window[head])
