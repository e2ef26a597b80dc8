"""KVCOMM (Ye et al., NeurIPS 2025): shift a shared chunk's cache to a new context by the
offsets seen in anchor examples, recomputing nothing.

For each chunk an anchor pool holds, from earlier requests (``anchors`` of them, the same
chunks in shuffled orders, ``anchor_seed``), the offset of the chunk's keys and values in that
context from its cache computed alone: Delta_a = KV(chunk | prefix_a) - KV(chunk alone), keys
compared in one position frame (re-rotated to position 0). In a new request the chunk's cache
is its alone cache plus a weighted sum of the anchors' offsets, the weights a softmax of minus
a distance, scaled by ``temperature`` times the median distance.

What the distance compares (``match``):
  content  the paper's rule: the chunk's own alone keys (at layer ``match_layer``, mean over
           heads and tokens) against the anchor chunk's; KVCOMM's agents share one prefix and
           the shared text varies, so tokens of similar content borrow similar offsets. In a
           RAG prompt every anchor of a chunk holds that same chunk, so all distances are 0
           and the offsets are averaged uniformly.
  prefix   kvlens's departure for RAG, where the chunk is fixed and its prefix varies (the
           default): the distance between the mean value vectors (layer ``match_layer``, of
           the chunks' alone caches) of the anchor's prefix and of the new prefix.
kvlens measures the anchors' offsets from full prefills of the anchor prompts (the paper
collects them online while serving) and keeps a fixed pool (no online admission).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.reuse.base import Context, ReuseMethod, RunOutput, uniform_schedule
from methods.reuse.history import earlier_request

MATCHES = ("prefix", "content")


def anchor_orders(n_chunks: int, anchors: int, seed: int) -> list[list[int]]:
    """The chunk orders of the anchor requests (seeded shuffles)."""
    rng = random.Random(f"anchors-{n_chunks}-{seed}")
    orders = []
    for _ in range(anchors):
        order = list(range(n_chunks))
        rng.shuffle(order)
        orders.append(order)
    return orders


def anchor_weights(distances: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of -d / (temperature * median d) over anchors (uniform if all d are 0)."""
    scale = float(distances.median()) * temperature
    if scale <= 0:
        scale = 1.0
    return torch.softmax(-distances / scale, dim=0)


@dataclass
class KVComm(ReuseMethod):
    anchors: int = 3
    temperature: float = 1.0
    match_layer: int = -1
    anchor_seed: int = 100
    match: str = "prefix"

    name: ClassVar[str] = "kvcomm"
    paper: ClassVar[str] = "Ye et al. 2025, KVCOMM"
    summary: ClassVar[str] = "alone caches shifted by anchor offsets weighted by prefix similarity"

    def validate(self) -> None:
        n = self.name
        require(self.anchors >= 1, n, f"anchors must be >= 1, got {self.anchors}")
        require(self.temperature > 0, n, f"temperature must be > 0, got {self.temperature}")
        require(self.match in MATCHES, n, f"match must be one of {', '.join(MATCHES)}")

    def _prefix_embedding(self, alone, prefix: list[int], layer: int) -> torch.Tensor:
        if not prefix:
            return torch.zeros(alone[0].values[layer].shape[-1])
        vals = torch.cat([alone[c].values[layer].float().mean(0) for c in prefix])  # [T, D]
        return vals.mean(0).cpu()

    def _distances(self, alone, pool, i: int, layer: int) -> torch.Tensor:
        """Per anchor, the distance that weighs its offset for chunk ``i``."""
        if self.match == "content":
            # every anchor holds this same chunk, so its alone keys are these: distance 0
            return torch.zeros(len(pool))
        new = self._prefix_embedding(alone, list(range(i)), layer)
        return torch.stack(
            [
                (new - self._prefix_embedding(alone, a.order[: a.order.index(i)], layer)).norm()
                for a in pool
            ]
        )

    def run(self, ctx: Context) -> RunOutput:
        lay = ctx.layout
        n_chunks = len(lay.chunks)
        alone = ctx.alone()
        layer = self.match_layer if self.match_layer >= 0 else ctx.n_layers // 2
        require(layer < ctx.n_layers, self.name, f"match_layer must be < {ctx.n_layers}")
        pool = []
        for order in anchor_orders(n_chunks, self.anchors, self.anchor_seed):
            key = ("anchor", tuple(order), ctx.rotation)
            if key not in ctx.extra:
                ctx.extra[key] = earlier_request(ctx, order)
            pool.append(ctx.extra[key])
        keys, values, weights = [], [], []
        for i, start in enumerate(lay.starts):
            w = anchor_weights(self._distances(alone, pool, i, layer), self.temperature)
            weights.append(w.tolist())
            k_i, v_i = [], []
            for lyr in range(ctx.n_layers):
                base_k, base_v = alone[i].keys[lyr].float(), alone[i].values[lyr].float()
                dk = sum(
                    wa * (ctx.rotary.shift(a.chunks[i].keys[lyr], -a.chunks[i].start, lyr).float()
                          - base_k)
                    for wa, a in zip(w.tolist(), pool)
                )  # fmt: skip
                dv = sum(
                    wa * (a.chunks[i].values[lyr].float() - base_v)
                    for wa, a in zip(w.tolist(), pool)
                )
                k_i.append(ctx.rotary.shift((base_k + dk).to(base_v.dtype), start, lyr))
                v_i.append((base_v + dv).to(alone[i].values[lyr].dtype))
            keys.append(k_i)
            values.append(v_i)
        cache = ctx.assemble(alone, values=values, keys=keys)
        none = torch.empty(0, dtype=torch.long)
        logits = ctx.finish(cache, none)
        return cache, logits, uniform_schedule(ctx, none), {"weights": weights}
