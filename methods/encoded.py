"""A store whose prompt part is re-encoded once after prefill (low rank, pruned channels,
merged layers, mixed precision, ...) while later tokens stay in full precision.

Before ``encode`` it holds per-head full-precision tokens. ``encode(h, encoding)`` replaces
head h's current tokens with an ``Encoding``: any object that can rebuild keys, values and
positions and counts the bytes it holds. Tokens appended afterwards form a full-precision tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from methods.base import Method, Observation
from methods.memory import held_bytes


class Encoding(Protocol):
    def keys(self) -> torch.Tensor: ...
    def values(self) -> torch.Tensor: ...
    def positions(self) -> torch.Tensor: ...
    def nbytes(self) -> int: ...


@dataclass
class CodedKV:
    """An Encoding from a coded key part and value part (each rebuilds its [L, D] tensor and
    counts its own bytes) and the int32 positions."""

    key: object
    value: object
    pos: torch.Tensor

    def keys(self) -> torch.Tensor:
        return self.key.rebuild()

    def values(self) -> torch.Tensor:
        return self.value.rebuild()

    def positions(self) -> torch.Tensor:
        return self.pos

    def nbytes(self) -> int:
        return self.key.nbytes() + self.value.nbytes() + held_bytes(self.pos)


class EncodedStore:
    """Per KV head: an optional encoding of the prompt, then a full-precision tail."""

    def __init__(self, n_kv_heads: int, head_dim: int, dtype, device) -> None:
        empty = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.tail_keys = [empty.clone() for _ in range(n_kv_heads)]
        self.tail_values = [empty.clone() for _ in range(n_kv_heads)]
        self.tail_pos = [torch.empty(0, dtype=torch.int32, device=device)] * n_kv_heads
        self.encodings: list[Encoding | None] = [None] * n_kv_heads

    @property
    def n_heads(self) -> int:
        return len(self.tail_pos)

    def lengths(self) -> list[int]:
        return [int(p.numel()) for p in self.positions]

    def encode(self, head: int, encoding: Encoding) -> None:
        """Replace everything head ``head`` holds now with ``encoding``."""
        self.encodings[head] = encoding
        self.tail_keys[head] = self.tail_keys[head][:0].clone()
        self.tail_values[head] = self.tail_values[head][:0].clone()
        self.tail_pos[head] = self.tail_pos[head][:0].clone()

    def _full(self, kind: str) -> list[torch.Tensor]:
        tails = {"keys": self.tail_keys, "values": self.tail_values, "positions": self.tail_pos}[
            kind
        ]
        out = []
        for h, enc in enumerate(self.encodings):
            if enc is None:
                out.append(tails[h])
            else:
                out.append(torch.cat([getattr(enc, kind)().to(tails[h].dtype), tails[h]]))
        return out

    @property
    def keys(self) -> list[torch.Tensor]:
        return self._full("keys")

    @property
    def values(self) -> list[torch.Tensor]:
        return self._full("values")

    @property
    def positions(self) -> list[torch.Tensor]:
        return self._full("positions")

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        pos = positions.to(torch.int32)
        for h in range(self.n_heads):
            self.tail_keys[h] = torch.cat([self.tail_keys[h], keys[h]])
            self.tail_values[h] = torch.cat([self.tail_values[h], values[h]])
            self.tail_pos[h] = torch.cat([self.tail_pos[h], pos])

    def keep(self, head: int, index: torch.Tensor) -> None:
        from probes.errors import KvlensError

        raise KvlensError("an encoded cache does not evict tokens")

    def aux_state(self, name: str, dtype=torch.float32):
        from probes.errors import KvlensError

        raise KvlensError("an encoded cache keeps no per-token method state")

    def nbytes(self) -> int:
        total = held_bytes(*self.tail_keys, *self.tail_values, *self.tail_pos)
        return total + sum(0 if e is None else e.nbytes() for e in self.encodings)


@dataclass
class PromptEncoder(Method):
    """A method that re-encodes each KV head's prompt once, after prefill, into an Encoding.

    Subclasses implement ``encode_head``; methods that encode across layers (MiniCache, xKV)
    override ``compress`` and keep only the store.
    """

    def new_store(self, n_kv_heads, head_dim, dtype, device):
        return EncodedStore(n_kv_heads, head_dim, dtype, device)

    def encode_head(
        self,
        obs: Observation,
        head: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
    ) -> Encoding:
        raise NotImplementedError

    def compress(self, store, obs: Observation) -> None:
        if not obs.prefill:
            return
        keys, values, positions = store.keys, store.values, store.positions
        for h in range(store.n_heads):
            store.encode(h, self.encode_head(obs, h, keys[h], values[h], positions[h]))
