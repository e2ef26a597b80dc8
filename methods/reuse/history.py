"""Chunk caches taken from an earlier request: the same chunks in another order.

Cache-Craft and KVCOMM reuse caches a server kept from earlier prompts, where a chunk sat
after other chunks than now. ``earlier_request`` prefills such a prompt (the same header, the
chunks in ``order``, no question) and cuts out each chunk's cache, with the attention mass each
chunk token put on the other chunks there (mean over layers and heads: Cache-Craft's
inter-chunk attention). Caches are returned per chunk in the current request's numbering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from methods.reuse.cache import ReuseCache
from methods.reuse.chunks import ChunkKV

if TYPE_CHECKING:
    from methods.reuse.base import Context


@dataclass
class Earlier:
    order: list[int]  # chunk indices in the order the earlier prompt held them
    chunks: list[ChunkKV]  # by current chunk index; ``start`` = position in the earlier prompt
    outside: list[torch.Tensor]  # per chunk, per token: mass on the other chunks


def earlier_request(ctx: Context, order: list[int], rotation_pre: bool = False) -> Earlier:
    """Prefill the header and the chunks in ``order`` (no question); each chunk's cache cut
    out, with its tokens' attention mass on the other chunks."""
    lay = ctx.layout
    ids = list(lay.header)
    seg = [-1] * len(lay.header)
    starts = {}
    for ci in order:
        starts[ci] = len(ids)
        ids += lay.chunks[ci]
        seg += [ci] * len(lay.chunks[ci])
    cache = ReuseCache(ctx.model)
    cache.segments = torch.tensor(seg)
    cache.run(ctx.model, ids, list(range(len(ids))))
    mass = torch.stack([layer.outside for layer in cache.layers]).mean(0)  # [T]
    chunks, outside = [None] * len(order), [None] * len(order)
    for ci in order:
        s, n = starts[ci], len(lay.chunks[ci])
        keys = [cache.keys(i)[:, s : s + n].clone() for i in range(ctx.n_layers)]
        values = [cache.values(i)[:, s : s + n].clone() for i in range(ctx.n_layers)]
        pre = None
        if rotation_pre:
            pos = torch.arange(s, s + n)
            pre = [ctx.rotary.unapply(k, pos, i) for i, k in enumerate(keys)]
        chunks[ci] = ChunkKV(list(lay.chunks[ci]), s, keys, values, pre)
        outside[ci] = mass[s : s + n].clone()
    return Earlier(list(order), chunks, outside)
