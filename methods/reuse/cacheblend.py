"""CacheBlend (Yao et al., EuroSys 2025): reuse every chunk cache, then recompute the keys and
values of the r% tokens with the highest KV deviation (HKVD), chosen progressively.

The layers before the first check layer are recomputed for every context token (layer 0's
keys/values do not depend on the context, so its output is what first shows the chunks'
missing cross-attention). At each check layer the fresh keys/values of the tokens still
selected are compared with the reused ones (squared L2 over heads and channels) and the
highest-deviation ones stay selected; after the last check layer only they are recomputed.
``steps=1`` (one check layer, at layer 1, selecting ``recompute`` of the chunk tokens) is the
schedule of the authors' LMCache implementation; ``steps>1`` is the paper's gradual filtering,
the ratio falling linearly from ``first`` to ``recompute`` over successive layers.
``deviation`` chooses what is compared (keys, values or both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.reuse.base import Context, ReuseMethod, RunOutput, Schedule

DEVIATIONS = ("key", "value", "kv")


def select_hkvd(
    fresh_k: torch.Tensor,
    fresh_v: torch.Tensor,
    old_k: torch.Tensor,
    old_v: torch.Tensor,
    count: int,
    deviation: str = "kv",
) -> torch.Tensor:
    """Indices (into the T tokens) of the ``count`` highest-deviation tokens; inputs
    [H, T, D]. Scores in float32."""
    score = torch.zeros(fresh_k.shape[1])
    if deviation in ("key", "kv"):
        score = score + ((fresh_k.float() - old_k.float()) ** 2).sum((0, 2)).cpu()
    if deviation in ("value", "kv"):
        score = score + ((fresh_v.float() - old_v.float()) ** 2).sum((0, 2)).cpu()
    count = max(0, min(count, score.numel()))
    return torch.topk(score, count).indices.sort().values


@dataclass
class CacheBlend(ReuseMethod):
    recompute: float = 0.15
    check_layer: int = 1
    steps: int = 1
    first: float = 0.0
    deviation: str = "kv"

    name: ClassVar[str] = "cacheblend"
    paper: ClassVar[str] = "Yao et al. 2025, CacheBlend"
    summary: ClassVar[str] = "recompute the tokens of highest KV deviation, found at an early layer"

    def validate(self) -> None:
        n = self.name
        require(
            0.0 <= self.recompute <= 1.0, n, f"recompute must be in [0, 1], got {self.recompute}"
        )
        require(self.check_layer >= 0, n, f"check_layer must be >= 0, got {self.check_layer}")
        require(self.steps >= 1, n, f"steps must be >= 1, got {self.steps}")
        require(0.0 <= self.first <= 1.0, n, f"first must be in [0, 1], got {self.first}")
        require(
            self.deviation in DEVIATIONS, n, f"deviation must be one of {', '.join(DEVIATIONS)}"
        )

    def ratios(self) -> list[float]:
        """The share of chunk tokens kept selected at each check layer."""
        start = max(self.first, self.recompute) if self.first else self.recompute
        if self.steps == 1:
            return [self.recompute]
        return [start + (self.recompute - start) * i / (self.steps - 1) for i in range(self.steps)]

    def run(self, ctx: Context) -> RunOutput:
        require(
            self.check_layer + self.steps <= ctx.n_layers,
            self.name,
            f"check_layer + steps must be <= {ctx.n_layers} layers",
        )
        cache = ctx.assemble(ctx.alone())
        lay = ctx.layout
        chunk_pos = ctx.layout.chunk_positions()
        n = chunk_pos.numel()
        selected = chunk_pos
        computed: list[torch.Tensor] = []
        projected: dict[int, torch.Tensor] = {}
        head = torch.arange(len(lay.header))
        ids = lay.ids
        prev_layer = 0
        for step, ratio in enumerate(self.ratios()):
            layer = self.check_layer + step
            # the selected tokens run up to this layer; its fresh keys/values are compared
            if selected.numel():
                cache.run(
                    ctx.model, [ids[p] for p in selected.tolist()], selected, stop_after=layer
                )
                fresh_k, fresh_v = cache.layers[layer].fresh
                old_k = cache.keys(layer)[:, selected.to(fresh_k.device)]
                old_v = cache.values(layer)[:, selected.to(fresh_k.device)]
                keep = select_hkvd(
                    fresh_k, fresh_v, old_k, old_v, math.ceil(ratio * n - 1e-9), self.deviation
                )
                projected[layer] = selected
                computed += [torch.cat([head, selected])] * (layer - prev_layer)
                selected = selected[keep]
            else:
                computed += [head] * (layer - prev_layer)
            prev_layer = layer
        computed += [torch.cat([head, selected])] * (ctx.n_layers - prev_layer)
        logits = ctx.finish(cache, selected)
        notes = {"selected": selected.tolist()}
        return cache, logits, Schedule(computed, projected), notes
