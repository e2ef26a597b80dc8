"""KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction").

A stored KV pair matters if the model needs it to reconstruct its context. After the prefill,
the model is asked to repeat the context, teacher-forced: a repeat prompt then the context
itself is fed over the whole (uncompressed) cache, and each stored key is scored by the
*maximum* attention it receives from any replayed query of its KV group. The lowest-scoring
pairs are evicted; the question, still unseen, plays no part.

As the paper (and its code, and kvpress's KVzipPress):
- the context is replayed in chunks of ``chunk`` tokens, each chunk's input being
  ``"\\n\\nRepeat the previous context exactly.\\n"`` (later chunks: "Repeat the part of the
  previous context exactly, starting with" and the previous chunk's last 8 tokens) followed by
  the chunk. Each chunk's pass starts from the context cache alone, so memory is that of one
  chunk's queries over the cache: O(chunk x T), O(T) for a fixed chunk;
- the score of a chunk's key comes from a softmax over the first ``sinks`` keys, the chunk's
  own keys and the replayed tokens (``normalise=chunk``); ``normalise=full`` normalises over
  the whole cache instead (the same thing when one chunk covers the context);
- the first ``sinks`` positions always stay (kvpress's n_sink; the paper keeps the system
  prompt);
- ``level=pair`` ranks KV pairs: ``allocation=global`` keeps the top ``ratio`` of all pairs of
  every layer and head together (the paper's non-uniform budgets), ``layer`` the top ``ratio``
  of each layer's pairs (kvpress's layerwise), ``head`` the top ``ratio`` of each head's;
- ``level=head`` scores a head by its highest pair score and keeps the top ``ratio`` of heads
  whole, the others only their sinks and ``recent`` newest context tokens (the
  DuoAttention-style head-level variant the paper describes).
Scoring needs a pass over the model after the prefill (``Method.prepare``, which
``methods.evaluate.prefill_logits`` calls for every entry point); the forward pass through the
replay attends through kvlens' attention function like every compressed cache. Tokens arriving
after the compression (the question, generated tokens) are all kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from methods.base import Method, require
from methods.registry import register
from probes.attention import hand_over
from probes.compat import cache_arg
from probes.errors import KvlensError

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
SUFFIX = "\n"
OVERLAP = 8  # tokens of the previous chunk that start a later chunk's prompt
LEVELS = ("pair", "head")
ALLOCATIONS = ("global", "layer", "head")
NORMALISE = ("chunk", "full")


def replay_inputs(
    context_ids: list[int], tokenizer, chunk: int
) -> list[tuple[int, int, list[int]]]:
    """Per chunk: (start, end) of its context positions and the ids to replay for it."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for start in range(0, len(context_ids), chunk):
        end = min(start + chunk, len(context_ids))
        if start == 0:
            prompt = encode(FIRST_PROMPT)
        else:
            prompt = encode(LATER_PROMPT) + context_ids[max(0, start - OVERLAP) : start]
        out.append((start, end, prompt + encode(SUFFIX) + context_ids[start:end]))
    return out


class _ReplayLayer(CacheLayerMixin):
    """One layer of the replay: holds the context's keys/values, attends exactly over them
    plus the replayed tokens, and records each context key's maximum attention."""

    is_sliding = False

    def __init__(self, idx: int, keys: list[torch.Tensor], values: list[torch.Tensor], score):
        super().__init__()
        self.layer_idx = idx
        self.ctx_keys, self.ctx_values = keys, values  # per KV head [T, D]
        self.n_ctx = keys[0].shape[0]
        self.score = score  # callable(layer, head, probs [G, q, T + q], n_ctx)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        hand_over(self)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.n_ctx

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_ctx + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def attend(self, query, key, value, *, scale, sliding_window=None, softcap=None):
        t, q = self.n_ctx, query.shape[2]
        group = query.shape[1] // key.shape[1]
        pos = torch.arange(t + q, device=query.device)
        qpos = torch.arange(t, t + q, device=query.device)
        allowed = pos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            allowed &= pos[None, :] > qpos[:, None] - sliding_window
        out = torch.empty_like(query)
        for h in range(key.shape[1]):
            rows = slice(h * group, (h + 1) * group)
            k = torch.cat([self.ctx_keys[h], key[0, h]]).float()
            v = torch.cat([self.ctx_values[h], value[0, h]]).float()
            logits = query[0, rows].float() @ k.T * scale  # [G, q, T + q]
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            logits = logits.masked_fill(~allowed, float("-inf"))
            self.score(self.layer_idx, h, logits)
            out[0, rows] = (torch.softmax(logits, -1) @ v).to(query.dtype)
        return out


@register
@dataclass
class KVzip(Method):
    ratio: float = 0.3
    level: str = "pair"
    allocation: str = "global"
    chunk: int = 2048
    sinks: int = 4
    recent: int = 32
    normalise: str = "chunk"

    name: ClassVar[str] = "kvzip"
    family: ClassVar[str] = "eviction"
    paper: ClassVar[str] = (
        "Kim et al. 2025, KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
    )
    summary: ClassVar[str] = (
        "keep the KV pairs the model attends to most while replaying (repeating) its context, "
        "scored after the prefill (query-agnostic)"
    )
    decode_needs_attention: ClassVar[bool] = False
    prepares: ClassVar[bool] = True

    def validate(self) -> None:
        require(0.0 < self.ratio <= 1.0, self.name, f"ratio must be in (0, 1], got {self.ratio}")
        for param, allowed in (
            ("level", LEVELS),
            ("allocation", ALLOCATIONS),
            ("normalise", NORMALISE),
        ):
            value = getattr(self, param)
            require(
                value in allowed,
                self.name,
                f"{param} must be {' or '.join(allowed)}, not '{value}'",
            )
        require(self.chunk >= 1, self.name, f"chunk must be >= 1 token, got {self.chunk}")
        require(self.sinks >= 0, self.name, f"sinks must be >= 0, got {self.sinks}")
        require(self.recent >= 0, self.name, f"recent must be >= 0, got {self.recent}")

    def setup(self, model) -> None:
        self._scored = False  # one method instance per compressed cache

    def compress(self, store, obs) -> None:
        if not obs.prefill and not getattr(self, "_scored", False):
            raise KvlensError(
                "kvzip scores the context by a replay after the prefill: prefill through "
                "methods.evaluate.prefill_logits (compare, ask, sweep and the app do)"
            )

    def replay_scores(self, model, cache, context_ids: list[int], tokenizer) -> torch.Tensor:
        """[layers, KV heads, T] max attention each stored context key receives in the replay."""
        if tokenizer is None:
            raise KvlensError("kvzip needs the model's tokenizer to build its repeat prompt")
        stores = [layer.store for layer in cache.layers]
        t = len(context_ids)
        if any(length != t for store in stores for length in store.lengths()):
            raise KvlensError("kvzip scores a cache that holds the whole context, once")
        keys = [store.keys for store in stores]
        values = [store.values for store in stores]
        n_heads = stores[0].n_heads
        scores = torch.zeros(len(stores), n_heads, t, device=keys[0][0].device)
        for start, end, ids in replay_inputs(context_ids, tokenizer, self.chunk):

            def record(layer: int, head: int, logits: torch.Tensor, start=start, end=end) -> None:
                if self.normalise == "chunk":  # softmax over sinks, the chunk and the replay
                    cols = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
                    cols[:t] = False
                    cols[: min(self.sinks, start)] = True
                    cols[start:end] = True
                    logits = logits.masked_fill(~cols, float("-inf"))
                probs = torch.softmax(logits, -1)[..., start:end]
                scores[layer, head, start:end] = probs.amax(dim=(0, 1))

            layers = [_ReplayLayer(i, keys[i], values[i], record) for i in range(len(stores))]
            replay = Cache(layers=layers)
            with torch.inference_mode():
                model.base_model(
                    input_ids=torch.tensor([ids], device=model.device),
                    **cache_arg(model, replay),
                    use_cache=True,
                )
        return scores

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool [layers, heads, T]: the pairs to keep, from replay scores."""
        n_layers, n_heads, t = scores.shape
        s = scores.clone()
        s[..., : self.sinks] = float("inf")
        keep = torch.zeros_like(s, dtype=torch.bool)
        if self.level == "head":
            head_score = scores[..., self.sinks :].amax(-1) if t > self.sinks else scores.amax(-1)
            n_whole = round(self.ratio * n_layers * n_heads)
            whole = torch.zeros(n_layers * n_heads, dtype=torch.bool, device=s.device)
            whole[torch.topk(head_score.reshape(-1), n_whole).indices] = True
            keep[whole.view(n_layers, n_heads)] = True
            keep[..., : self.sinks] = True
            keep[..., max(0, t - self.recent) :] = True
            return keep
        if self.allocation == "global":
            flat = s.reshape(-1)
            idx = torch.topk(flat, round(self.ratio * flat.numel())).indices
            keep.view(-1)[idx] = True
        elif self.allocation == "layer":
            flat = s.reshape(n_layers, -1)
            idx = torch.topk(flat, round(self.ratio * flat.shape[1]), dim=-1).indices
            keep.view(n_layers, -1).scatter_(1, idx, True)
        else:
            idx = torch.topk(s, round(self.ratio * t), dim=-1).indices
            keep.scatter_(2, idx, True)
        return keep

    def prepare(self, model, cache, context_ids: list[int], tokenizer) -> None:
        scores = self.replay_scores(model, cache, context_ids, tokenizer)
        keep = self.keep_mask(scores)
        for i, layer in enumerate(cache.layers):
            for h in range(layer.store.n_heads):
                if not keep[i, h].all():
                    layer.store.keep(h, keep[i, h].nonzero()[:, 0])
            if hasattr(layer.store, "shrink"):
                layer.store.shrink()
        self._scored = True
