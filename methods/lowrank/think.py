"""ThinK (Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning").

Key channels matter unequally: after prefill, each KV head scores channel c by
||Q_window[:, c]|| * ||K[:, c]|| (the observation-window queries of its query group against
the prompt's keys) and keeps the top (1 - ``prune``) fraction of channels; the cache stores
only those channels of the prompt's keys plus their indices. Values are untouched. Pruned
channels contribute nothing to q.k. Later tokens stay in full precision.

The paper has no grouped-query heads; how a KV head pools the query norms of its group is
``group_pool``: ``norm`` (default) averages the heads' norms ||Q_g[:, c]||; ``square`` averages
their squared norms and squares the key norm too, which ranks channels as kvpress's
ThinKPress does. Both are the paper's score for a single query head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import PromptEncoder
from methods.memory import held_bytes
from methods.registry import register


@dataclass
class PrunedKeys:
    kept_keys: torch.Tensor  # [L, d_kept]
    channels: torch.Tensor  # int16 [d_kept]
    head_dim: int
    vals: torch.Tensor
    pos: torch.Tensor

    def keys(self):
        out = torch.zeros(
            self.kept_keys.shape[0],
            self.head_dim,
            dtype=self.kept_keys.dtype,
            device=self.kept_keys.device,
        )
        out[:, self.channels.long()] = self.kept_keys
        return out

    def values(self):
        return self.vals

    def positions(self):
        return self.pos

    def nbytes(self):
        return held_bytes(self.kept_keys, self.channels, self.vals, self.pos)


@register
@dataclass
class ThinK(PromptEncoder):
    prune: float = 0.5
    window: int = 32
    group_pool: str = "norm"

    name: ClassVar[str] = "think"
    family: ClassVar[str] = "low rank"
    paper: ClassVar[str] = "Xu et al. 2024, ThinK: Thinner Key Cache by Query-Driven Pruning"
    summary: ClassVar[str] = "drop the key channels with the least query-key magnitude"

    def validate(self) -> None:
        require(0.0 <= self.prune < 1.0, self.name, f"prune must be in [0, 1), got {self.prune}")
        require(self.window >= 1, self.name, f"window must be >= 1, got {self.window}")
        require(
            self.group_pool in ("norm", "square"),
            self.name,
            f"group_pool must be norm or square, got {self.group_pool!r}",
        )

    def observation_window(self) -> int:
        return self.window

    def encode_head(self, obs, head, keys, values, positions):
        d = keys.shape[-1]
        n_keep = max(1, round(d * (1 - self.prune)))
        q = obs.window_queries[head].float()  # [G, W, D]
        if self.group_pool == "square":  # kvpress: squared norms, averaged over the group
            score = q.pow(2).sum(1).mean(0) * keys.float().pow(2).sum(0)
        else:
            score = q.norm(dim=1).mean(0) * keys.float().norm(dim=0)
        channels = torch.topk(score, n_keep).indices.sort().values
        return PrunedKeys(
            keys[:, channels].clone(),
            channels.to(torch.int16),
            d,
            values.clone(),
            positions.clone(),
        )
