"""Composition across families: ``first+second``, e.g. ``snapkv:budget=512+kivi:bits=4``.

One mechanism for every pair (no per-pair code): the composite's store is the *second*
method's store, one per KV head (heads keep different tokens after an eviction), and the
*first* method's eviction decisions are applied to it while its tokens still sit in full
precision; only then does the second method compress what is kept. So ``snapkv+kivi`` keeps
exactly the positions SnapKV alone keeps, and holds them as KIVI's codes; ``kvzip+kivi`` waits
for KVzip's replay (``Method.prepare``) before quantising.

What composes, each refusal one line:
- first: an eviction or head-aware method that evicts once, at the prefill (or in its
  ``prepare``); an eviction that goes on while decoding would have to drop single tokens from
  quantised groups (``schedule=prefill`` gives the once-only variant where a method has one);
- second: a quantiser that holds tokens in a token store (``kivi``, ``int8``, ``rotatekv``).
Bytes are the sum of the per-head stores' bytes (``methods.memory``: codes, scales, residual,
positions) and any per-token state the first method keeps. Decoding reads the store as kept:
each KV head's codes go through the quantised decode kernel (``kvlens_kernels.quant_decode``: Triton
on CUDA), one call per KV head; there is no fused sparse-over-quantised kernel, and where the
per-head store cannot decode (a rotation to undo, ``rotatekv``) the exact reference path runs.
"""

from __future__ import annotations

import dataclasses

import torch

from methods.base import Method, Observation
from methods.memory import element_bytes
from methods.quantization.store import QuantHeadStore
from probes.errors import KvlensError

FIRSTS = ("eviction", "head-aware")


class ComposedStore:
    """Per KV head, one store of the second method (1 head each), plus per-token state."""

    def __init__(self, second: Method, n_heads: int, head_dim: int, dtype, device) -> None:
        self.second = second
        self.head_dim, self.dtype, self.device = head_dim, dtype, device
        self.heads = [self._fresh() for _ in range(n_heads)]
        self._aux: dict[str, list[torch.Tensor]] = {}
        self.released = False  # the first method's eviction is final: the second may compress

    def _fresh(self):
        store = self.second.new_store(1, self.head_dim, self.dtype, self.device)
        if not isinstance(store, QuantHeadStore):
            raise KvlensError(
                f"compose: {self.second.name} does not keep a token store that an eviction "
                "can feed; the second method must be kivi, int8 or rotatekv"
            )
        return store

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    def lengths(self) -> list[int]:
        return [s.n_tokens for s in self.heads]

    @property
    def keys(self) -> list[torch.Tensor]:
        return [s.keys[0] for s in self.heads]

    @property
    def values(self) -> list[torch.Tensor]:
        return [s.values[0] for s in self.heads]

    @property
    def positions(self) -> list[torch.Tensor]:
        return [s.positions[0] for s in self.heads]

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        for h, store in enumerate(self.heads):
            store.append(keys[h : h + 1], values[h : h + 1], positions)
        t = positions.numel()
        for bufs in self._aux.values():
            for h, buf in enumerate(bufs):
                bufs[h] = torch.cat([buf, buf.new_zeros(t)])

    def aux_state(self, name: str, dtype=torch.float32) -> list[torch.Tensor]:
        if name not in self._aux:
            self._aux[name] = [
                torch.zeros(n, dtype=dtype, device=self.device) for n in self.lengths()
            ]
        return self._aux[name]

    def keep(self, head: int, index: torch.Tensor) -> None:
        """Keep head ``head``'s tokens at ``index``: rebuilt from its full-precision rows."""
        old = self.heads[head]
        if old.quantized_tokens():
            raise KvlensError(
                "compose: the eviction came after quantisation; it must evict once, at the "
                "prefill (schedule=prefill where the method has one)"
            )
        index = index.sort().values.to(old.positions[0].device)
        new = self._fresh()
        new.append(old.keys[0][index][None], old.values[0][index][None], old.positions[0][index])
        self.heads[head] = new
        for bufs in self._aux.values():
            bufs[head] = bufs[head][index]

    def compress_with(self, method: Method, obs: Observation) -> None:
        """Let the second method compress each head's store (KIVI: quantise what is kept)."""
        for store in self.heads:
            head_obs = dataclasses.replace(
                obs,
                positions=[store.positions[0]],
                keys=None,
                received=None,
                window=None,
                last=None,
                window_queries=None,
            )
            method.compress(store, head_obs)

    @property
    def supports_decode(self) -> bool:
        return all(s.supports_decode for s in self.heads)

    def decode(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """One token's queries [Hq, D] over each head's codes (the quantised decode kernel)."""
        group = query.shape[0] // self.n_heads
        return torch.cat(
            [s.decode(query[h * group : (h + 1) * group], scale) for h, s in enumerate(self.heads)]
        )

    def quantized_tokens(self) -> int:
        return sum(s.quantized_tokens() for s in self.heads)

    def nbytes(self) -> int:
        total = sum(s.nbytes() for s in self.heads)
        for bufs in self._aux.values():
            total += sum(b.numel() * element_bytes(b.dtype) for b in bufs)
        return total


class Composed(Method):
    """``first`` evicts, ``second`` quantises what is kept (see the module docstring)."""

    name = "compose"
    paper = "composition of two methods (kvlens)"
    summary = "eviction, then quantisation of the kept tokens"

    def __init__(self, first: Method, second: Method) -> None:
        self.first, self.second = first, second
        self.family = f"{first.family}+{second.family}"
        self.validate()

    def validate(self) -> None:
        first, second = self.first, self.second
        if first.family not in FIRSTS:
            raise KvlensError(
                f"compose: the first method must evict (eviction or head-aware), "
                f"not {first.name} ({first.family})"
            )
        if second.family != "quantisation":
            raise KvlensError(
                f"compose: the second method must quantise, not {second.name} ({second.family})"
            )
        if not isinstance(second.new_store(1, 8, torch.float32, "cpu"), QuantHeadStore):
            raise KvlensError(
                f"compose: {second.name} re-encodes the whole prompt, not a token store an "
                "eviction can feed; the second method must be kivi, int8 or rotatekv"
            )
        if getattr(first, "evict_while_decoding", False) or first.decode_needs_attention:
            raise KvlensError(
                f"compose: {first.name} evicts while decoding, which a quantised store cannot "
                "follow; give it schedule=prefill"
            )

    @property
    def decode_needs_attention(self) -> bool:  # type: ignore[override]
        return False

    @property
    def prepares(self) -> bool:  # type: ignore[override]
        return self.first.prepares

    def observation_window(self) -> int:
        return self.first.observation_window()

    def setup(self, model) -> None:
        self.first.setup(model)
        self.second.setup(model)

    def new_store(self, n_kv_heads, head_dim, dtype, device):
        return ComposedStore(self.second, n_kv_heads, head_dim, dtype, device)

    def compress(self, store: ComposedStore, obs: Observation) -> None:
        self.first.compress(store, obs)
        if not self.first.prepares:
            store.released = True
        if store.released:
            store.compress_with(self.second, obs)

    def prepare(self, model, cache, context_ids, tokenizer) -> None:
        self.first.prepare(model, cache, context_ids, tokenizer)
        for layer in cache.layers:
            layer.store.released = True
            obs = Observation(
                layer=layer.layer_idx,
                n_layers=layer.n_layers,
                prefill=True,
                n_queries=len(context_ids),
                n_seen=layer.n_seen,
                scale=1.0,
                positions=layer.store.positions,
                keys=None,
                received=None,
                window=None,
                last=None,
                window_queries=None,
            )
            layer.store.compress_with(self.second, obs)

    def spec(self) -> str:
        return f"{self.first.spec()}+{self.second.spec()}"


def compose(first: Method | None, second: Method | None) -> Composed:
    """The composite of two created methods; ``full`` (None) composes with nothing."""
    if first is None or second is None:
        raise KvlensError("compose: 'full' keeps everything; it cannot be part of a composition")
    return Composed(first, second)
