"""Per-chunk caches: a chunk prefilled alone (as if cached by an earlier request) and moved to
the position it takes in a new prompt, its keys re-rotated (``methods.reuse.rotary``): the
chunk caches of CacheBlend (Yao et al. 2025) and of PromptCache (Gim et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.reuse.cache import ReuseCache
from methods.reuse.rotary import Rotary
from probes.attention import Recorder, recording
from probes.errors import KvlensError

ROTATIONS = ("delta", "pre_rope")


@dataclass
class ChunkKV:
    """One chunk's cache: per layer keys (post-RoPE, at positions ``start..``) and values
    [Hkv, n, D]; ``keys_pre`` the pre-RoPE keys where they were recorded."""

    ids: list[int]
    start: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    keys_pre: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def prefill_chunk(model, ids: list[int], start: int = 0, pre_rope: bool = False) -> ChunkKV:
    """Prefill ``ids`` alone at positions ``start..start+n-1``; with ``pre_rope`` also keep
    the pre-RoPE keys (from kvlens' key-projection hooks)."""
    if not ids:
        raise KvlensError("a chunk must hold at least one token")
    cache = ReuseCache(model)
    positions = list(range(start, start + len(ids)))
    rec = Recorder(kv=True, stats=False, maps=False)
    if pre_rope:
        with recording(rec):
            cache.run(model, ids, positions)
    else:
        cache.run(model, ids, positions)
    keys = [cache.keys(i)[:, start:].clone() for i in range(len(cache.layers))]
    values = [cache.values(i)[:, start:].clone() for i in range(len(cache.layers))]
    pre = None
    if pre_rope:
        device = keys[0].device
        pre = [rec.keys_pre_rope[i].to(device, keys[0].dtype) for i in range(len(keys))]
    return ChunkKV(list(ids), start, keys, values, pre)


def place(chunk: ChunkKV, start: int, rotary: Rotary, how: str = "delta") -> list[torch.Tensor]:
    """The chunk's keys per layer as they would be at positions ``start..``: rotated by the
    delta ``start - chunk.start`` (``delta``) or RoPE applied afresh to the pre-RoPE keys."""
    if how not in ROTATIONS:
        raise KvlensError(f"rotation must be one of {', '.join(ROTATIONS)}, not '{how}'")
    if how == "delta":
        return [rotary.shift(k, start - chunk.start, i) for i, k in enumerate(chunk.keys)]
    if chunk.keys_pre is None:
        raise KvlensError("this chunk cache kept no pre-RoPE keys; prefill it with pre_rope")
    pos = torch.arange(start, start + len(chunk))
    return [rotary.apply(k, pos, i) for i, k in enumerate(chunk.keys_pre)]
