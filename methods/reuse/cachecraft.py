"""Cache-Craft (Agarwal et al., SIGMOD 2025): reuse chunk caches kept from earlier requests,
decide per chunk how much fixing its cache needs, and recompute a small fraction of tokens.

kvlens's reading of the paper's metrics, measured from the request that made each cache:
  inter-attention a_t  attention mass chunk token t put on *other* chunks (mean over layers
                       and heads); the chunk's Cache Context Impact CCI_i = mean_t a_t;
  prefix overlap beta  chunks before chunk i both then and now, over those before it then or
                       now (|old & new| / |old | new|: 1 only when the sets agree; a share of
                       the new prefix alone would call a cache exact that saw a chunk now
                       gone, a share of the old alone one that misses a chunk now before it);
  order penalty gamma  share of those common chunks' pairs still in the same order.
The fix a chunk needs is CFO_i = CCI_i * (1 - beta_i * gamma_i): a chunk whose prefix is the
same as when cached (a prefix hit) needs none, one that attended little outside itself needs
little. Chunks with CFO_i <= ``reuse_below`` are reused as they are; the ``recompute`` budget
(share of all chunk tokens) is spread over the others in proportion to CFO_i, each recomputing
its tokens of highest a_t (the tokens focused on the context). The earlier request holds the
same chunks in a shuffled order (``history_seed``), the setting the paper measures.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.reuse.base import Context, ReuseMethod, RunOutput, uniform_schedule
from methods.reuse.history import earlier_request


def prefix_overlap(old: list[int], new: list[int]) -> tuple[float, float]:
    """(beta, gamma) of a chunk whose prefix chunks were ``old`` and are ``new`` (in order)."""
    union = set(old) | set(new)
    if not union:
        return 1.0, 1.0
    common = [c for c in new if c in old]
    beta = len(common) / len(union)
    pairs = [(a, b) for i, a in enumerate(common) for b in common[i + 1 :]]
    if not pairs:
        return beta, 1.0
    same = sum(old.index(a) < old.index(b) for a, b in pairs)
    return beta, same / len(pairs)


def history_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(f"history-{n}-{seed}").shuffle(order)
    return order


@dataclass
class CacheCraft(ReuseMethod):
    recompute: float = 0.15
    reuse_below: float = 0.0
    history_seed: int = 1

    name: ClassVar[str] = "cachecraft"
    paper: ClassVar[str] = "Agarwal et al. 2025, Cache-Craft"
    summary: ClassVar[str] = (
        "caches from an earlier request; per chunk, fix tokens by prefix overlap and focus"
    )

    def validate(self) -> None:
        n = self.name
        require(
            0.0 <= self.recompute <= 1.0, n, f"recompute must be in [0, 1], got {self.recompute}"
        )
        require(self.reuse_below >= 0.0, n, f"reuse_below must be >= 0, got {self.reuse_below}")

    def plan(self, earlier, lengths: list[int]) -> tuple[list[float], list[int]]:
        """Per chunk: CFO and how many tokens to recompute."""
        n_chunks = len(lengths)
        cfo = []
        for i in range(n_chunks):
            old = earlier.order[: earlier.order.index(i)]
            beta, gamma = prefix_overlap(old, list(range(i)))
            cfo.append(float(earlier.outside[i].mean()) * (1.0 - beta * gamma))
        fix = [c if c > self.reuse_below else 0.0 for c in cfo]
        total = sum(fix)
        budget = self.recompute * sum(lengths)
        counts = [
            min(n, math.ceil(budget * f / total - 1e-9)) if total > 0 else 0
            for n, f in zip(lengths, fix)
        ]
        return cfo, counts

    def run(self, ctx: Context) -> RunOutput:
        lay = ctx.layout
        key = ("history", self.history_seed, ctx.rotation)
        if key not in ctx.extra:
            order = history_order(len(lay.chunks), self.history_seed)
            ctx.extra[key] = earlier_request(ctx, order, ctx.rotation == "pre_rope")
        earlier = ctx.extra[key]
        cache = ctx.assemble(earlier.chunks)
        cfo, counts = self.plan(earlier, [len(c) for c in lay.chunks])
        picked = []
        for i, (start, k) in enumerate(zip(lay.starts, counts)):
            if k:
                top = torch.topk(earlier.outside[i], k).indices
                picked.append(top + start)
        recompute = torch.cat(picked).sort().values if picked else torch.empty(0, dtype=torch.long)
        logits = ctx.finish(cache, recompute)
        notes = {
            "cfo": cfo,
            "counts": counts,
            "order": earlier.order,
            "selected": recompute.tolist(),
        }
        return cache, logits, uniform_schedule(ctx, recompute), notes
