"""What a compression method is: a parameter dataclass with a name, a family and a paper.

A method sees each layer's attention through one typed ``Observation`` and changes that
layer's store (evicts, quantises, merges). Methods never run the model themselves: the
compressed cache calls them from inside kvlens' attention function.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from probes.errors import KvlensError


@dataclass
class Observation:
    """What one layer's attention call showed, handed to a method after the call.

    Per KV head h (lists of length n_kv_heads), over the tokens the store holds *after*
    appending this call's new tokens:
      positions[h]  int64 [L_h] absolute positions of the stored tokens (int32 views of the
                    store on kernel decode steps)
      received[h]   float32 [G, L_h] attention mass from this call's queries (per query head)
      window[h]     float32 [G, L_h] mass from the last ``window`` queries of this call
      last[h]       float32 [G, L_h] attention of this call's last query
    ``n_queries`` is the number of queries in this call (prompt length at prefill, 1 when
    decoding); ``prefill`` tells the two apart; ``n_seen`` counts every token seen so far.
    """

    layer: int
    n_layers: int
    prefill: bool
    n_queries: int
    n_seen: int
    scale: float
    positions: list[torch.Tensor]
    keys: list[torch.Tensor] | None  # None (with the three statistics) on kernel decode steps
    received: list[torch.Tensor] | None
    window: list[torch.Tensor] | None
    last: list[torch.Tensor] | None
    window_queries: list[torch.Tensor] | None  # [G, W, D]: the last W queries of this call

    def window_logits(self, head: int) -> torch.Tensor:
        """Scaled scores [G, W, L_h] of the window queries, -inf where causally masked."""
        q = self.window_queries[head].float()
        w = q.shape[1]
        logits = q @ self.keys[head].float().T * self.scale
        qpos = torch.arange(self.n_seen - w, self.n_seen, device=logits.device)
        visible = self.positions[head][None, :] <= qpos[:, None]
        return logits.masked_fill(~visible, float("-inf"))


@dataclass
class DecodeStep:
    """What a selecting method (the sparse family) sees on one decoding step, before the
    step's attention: the step's post-RoPE queries [Hq, D] (query head j reads KV head
    j // group) and ``n_seen``, the tokens seen with this one (already in the store)."""

    layer: int
    n_layers: int
    n_seen: int
    scale: float
    query: torch.Tensor
    group: int


@dataclass
class Selection:
    """The stored rows one decoding step reads, per KV head, as pages of ``page_size`` rows:
    page p covers store rows [p * P, (p + 1) * P) (a page size of 1 lists single rows).
    ``pages[h]`` int64, distinct, ascending. ``select_bytes``: what choosing them read (page
    summaries, centroids, or every key for the oracle), counted by ``methods.memory``."""

    pages: list[torch.Tensor]
    page_size: int = 1
    select_bytes: int = 0

    def rows(self, head: int, length: int) -> torch.Tensor:
        """Store rows (int64, ascending) head ``head`` reads when it holds ``length`` rows."""
        p = self.pages[head].to(torch.int64)
        offs = torch.arange(self.page_size, device=p.device)
        rows = (p[:, None] * self.page_size + offs[None, :]).reshape(-1)
        return rows[rows < length]


@dataclass
class Method:
    """Base of every method. Subclasses are dataclasses whose fields are the parameters."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: whether ``compress`` reads attention statistics (received/window/last/keys) on decoding
    #: steps; methods that do not (position rules, prefill-only eviction, quantisation) let
    #: the cache decode through the store's kernel, and get those Observation fields as None
    decode_needs_attention: ClassVar[bool] = True
    #: whether the method runs a pass of its own over the model once the prefill is stored
    #: (KVzip's context replay): ``CompressedCache.prepare`` then calls ``prepare``
    prepares: ClassVar[bool] = False
    #: whether the method chooses, on each decoding step, which stored rows the step's
    #: attention reads (the sparse family keeps the whole cache): the cache then calls
    #: ``select`` before attending and attends exactly over the selected rows only
    selects: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check parameters; raise KvlensError naming the parameter and the allowed range."""

    def observation_window(self) -> int:
        """How many of a call's last queries the ``window`` statistic should cover."""
        return 1

    def setup(self, model) -> None:
        """Called once per compressed cache with the model (e.g. to score heads)."""

    def prepare(self, model, cache, context_ids: list[int], tokenizer) -> torch.Tensor | None:
        """Called once after the first prefill of ``context_ids`` into ``cache`` (a
        ``methods.cache.CompressedCache``), by ``methods.evaluate.prefill_logits``, the one
        path every entry point prefills through; only when ``prepares`` is True. A method
        that prefills the cache again (GemFilter) returns that prefill's next-token logits,
        which replace the first prefill's; others return None."""

    def select(self, store, step: DecodeStep) -> Selection:
        """Per KV head, the stored rows this decoding step reads (called when ``selects``;
        the store holds this step's token already)."""
        raise NotImplementedError

    def new_store(self, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        """The storage this method's layers keep (default: per-head full-precision tokens)."""
        from methods.cache import HeadStore

        return HeadStore(n_kv_heads, head_dim, dtype, device)

    def compress(self, store, obs: Observation) -> None:
        """Change ``store`` (a ``methods.cache.HeadStore``) after one attention call."""
        raise NotImplementedError

    def spec(self) -> str:
        """The spec string that recreates this method, e.g. ``snapkv:budget=128,window=32``."""
        params = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        return f"{self.name}:{params}" if params else self.name

    @classmethod
    def parameters(cls) -> list[tuple[str, type, object]]:
        return [(f.name, f.type, f.default) for f in fields(cls)]


def require(condition: bool, method: str, message: str) -> None:
    """Raise the one-line parameter error of ``method`` unless ``condition`` holds."""
    if not condition:
        raise KvlensError(f"{method}: {message}")
