"""What a chunk-reuse method works with (CacheBlend, Yao et al. 2025; Cache-Craft, Agarwal
et al. 2025; KVCOMM, Ye et al. 2025), and the two steps every method shares.

A prompt is a header (the prefix: computed fresh, as prefix caching would), N chunks whose
caches are reused, and a question (always computed). A method decides which chunk caches to
use and which context tokens to recompute; ``assemble`` writes the header and the placed chunk
caches into a ``ReuseCache``, ``finish`` recomputes the chosen tokens at every layer together
with the question and returns the next-token logits. The schedule of what was computed per
layer is kept, so prefill FLOPs are counted by the method's own schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from methods.reuse.cache import ReuseCache
from methods.reuse.chunks import ChunkKV, place, prefill_chunk
from methods.reuse.rotary import Rotary
from probes.errors import KvlensError


@dataclass
class Layout:
    """Token ids of the segments and where each starts in the prompt."""

    header: list[int]
    chunks: list[list[int]]
    question: list[int]

    @property
    def starts(self) -> list[int]:
        out, at = [], len(self.header)
        for c in self.chunks:
            out.append(at)
            at += len(c)
        return out

    @property
    def n_context(self) -> int:
        return len(self.header) + sum(len(c) for c in self.chunks)

    @property
    def ids(self) -> list[int]:
        return self.header + [t for c in self.chunks for t in c] + self.question

    def segments(self) -> list[int]:
        """Per prompt position: -1 header, i chunk i, -2 question."""
        seg = [-1] * len(self.header)
        for i, c in enumerate(self.chunks):
            seg += [i] * len(c)
        return seg + [-2] * len(self.question)

    def chunk_positions(self) -> torch.Tensor:
        return torch.arange(len(self.header), self.n_context)


@dataclass
class Schedule:
    """Per layer, the context positions whose queries (and MLP) ran; ``projected``: positions
    whose keys/values alone were computed at a layer (CacheBlend's check layer)."""

    computed: list[torch.Tensor]
    projected: dict[int, torch.Tensor] = field(default_factory=dict)


class Context:
    """One request: the model, its RoPE, the layout, and chunk caches made once and shared."""

    def __init__(self, model, layout: Layout, rotation: str = "delta") -> None:
        if not layout.chunks or any(not c for c in layout.chunks):
            raise KvlensError("give at least one chunk, none empty")
        if not layout.question:
            raise KvlensError("the question is empty")
        self.model = model
        self.layout = layout
        self.rotary = Rotary(model)
        self.rotation = rotation
        self.n_layers = model.config.get_text_config().num_hidden_layers
        self._alone: list[ChunkKV] | None = None
        self.extra: dict[str, object] = {}  # caches of earlier requests (history, anchors)
        #: keep the question's attention rows on the host (``analysis.chunk_reuse``); timing
        #: runs turn it off
        self.record = True

    def alone(self) -> list[ChunkKV]:
        """Each chunk prefilled alone at position 0 (CacheBlend's chunk caches)."""
        if self._alone is None:
            pre = self.rotation == "pre_rope"
            self._alone = [prefill_chunk(self.model, c, 0, pre) for c in self.layout.chunks]
        return self._alone

    def assemble(self, chunk_kvs: list[ChunkKV], values=None, keys=None) -> ReuseCache:
        """A cache holding the header (fresh) and each chunk cache at its new position.
        ``keys``/``values``: per chunk, per layer replacements already placed (KVCOMM)."""
        cache = ReuseCache(self.model)
        lay = self.layout
        if lay.header:
            cache.run(self.model, lay.header, list(range(len(lay.header))))
        for ci, (kv, start) in enumerate(zip(chunk_kvs, lay.starts)):
            placed = keys[ci] if keys is not None else place(kv, start, self.rotary, self.rotation)
            vals = values[ci] if values is not None else kv.values
            pos = torch.arange(start, start + len(kv))
            for layer in range(self.n_layers):
                cache.write(layer, pos, placed[layer], vals[layer])
        return cache

    def finish(
        self, cache: ReuseCache, recompute: torch.Tensor, record: bool | None = None
    ) -> torch.Tensor:
        """Recompute context positions ``recompute`` at every layer with the question after
        them; the next-token logits. ``record`` (default ``self.record``) keeps the question's
        attention rows."""
        record = self.record if record is None else record
        lay = self.layout
        pos = sorted(int(p) for p in recompute)
        ids = lay.ids
        tokens = [ids[p] for p in pos] + lay.question
        positions = pos + list(range(lay.n_context, lay.n_context + len(lay.question)))
        return cache.run(
            self.model, tokens, positions, record_last=len(lay.question) if record else 0
        )


#: what ``ReuseMethod.run`` returns: the cache after the question, the next-token logits, the
#: schedule of what was computed and the method's notes
RunOutput = tuple[ReuseCache, torch.Tensor, Schedule, dict]


@dataclass
class ReuseMethod:
    """Base of every chunk-reuse method: a dataclass whose fields are its parameters."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        pass

    def run(self, ctx: Context) -> RunOutput:
        """(cache after the question, next-token logits, schedule, method notes)."""
        raise NotImplementedError

    def spec(self) -> str:
        params = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))
        return f"{self.name}:{params}" if params else self.name

    @classmethod
    def parameters(cls) -> list[tuple[str, type, object]]:
        return [(f.name, f.type, f.default) for f in fields(cls)]


def uniform_schedule(ctx: Context, recompute: torch.Tensor) -> Schedule:
    """Header and ``recompute`` computed at every layer (the question is counted apart)."""
    head = torch.arange(len(ctx.layout.header))
    both = torch.cat([head, recompute.reshape(-1).long()]).unique()
    return Schedule([both] * ctx.n_layers)
