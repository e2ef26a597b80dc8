"""A cache addressed by absolute position, for prefilling any subset of a prompt's tokens.

Chunk reuse (CacheBlend, Cache-Craft, KVCOMM) fills a prompt's cache from per-chunk caches,
then recomputes a chosen subset of tokens: those tokens run through the model at their own
positions while every other token's keys and values are read as stored. ``ReuseCache`` holds
dense keys/values ``[Hkv, T, D]`` per layer indexed by position; before each forward call the
caller names the positions of the call's tokens (``at``). ``update`` writes the call's fresh
keys/values there and hands the layer to kvlens' attention function, whose ``attend`` lets each
query see the filled positions at or before its own (the causal rule by position). A call may
stop after a layer's keys/values are computed (``stop_after``): CacheBlend's check layer.
``to_dynamic`` turns a complete cache into a transformers ``DynamicCache`` for decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

from probes.attention import hand_over
from probes.errors import KvlensError
from probes.models import model_facts


class StopForward(Exception):
    """Raised inside the model by the layer a call was asked to stop after."""


class ReuseLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, owner: ReuseCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.k: torch.Tensor | None = None  # [Hkv, C, D]
        self.v: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None  # [C] bool
        #: fresh keys/values of the last call (CacheBlend's deviation reads them)
        self.fresh: tuple[torch.Tensor, torch.Tensor] | None = None
        #: attention probabilities [Hq, Tq, C] of the last call's recorded queries
        self.rows: torch.Tensor | None = None
        #: per query of the last call, attention mass (mean over heads) on chunks other than
        #: its own (set when the cache knows each position's segment; Cache-Craft's focus)
        self.outside: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        h, d = key_states.shape[1], key_states.shape[-1]
        self.k = key_states.new_zeros(h, 0, d)
        self.v = value_states.new_zeros(h, 0, d)
        self.filled = torch.zeros(0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def grow(self, length: int) -> None:
        if self.k.shape[1] >= length:
            return
        extra = length - self.k.shape[1]
        self.k = torch.cat([self.k, self.k.new_zeros(self.k.shape[0], extra, self.k.shape[2])], 1)
        self.v = torch.cat([self.v, self.v.new_zeros(self.v.shape[0], extra, self.v.shape[2])], 1)
        self.filled = torch.cat([self.filled, self.filled.new_zeros(extra)])

    def write(self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [Hkv, T, D] at ``positions`` [T]."""
        self.grow(int(positions.max()) + 1)
        self.k[:, positions] = keys.to(self.k.dtype)
        self.v[:, positions] = values.to(self.v.dtype)
        self.filled[positions] = True

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise KvlensError("chunk reuse runs one sequence at a time (batch size 1)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pos = self.owner.positions
        self.fresh = (key_states[0], value_states[0])
        if self.owner.stop_after == self.layer_idx:
            raise StopForward
        self.write(pos, key_states[0], value_states[0])
        hand_over(self)
        return key_states, value_states

    def attend(self, query, key, value, *, scale, sliding_window=None, softcap=None):
        """Each query attends over the filled positions at or before its own: SDPA with that
        mask (float32 on the CPU, the model's dtype elsewhere), or blockwise softmax where the
        attention mass on other chunks is wanted (``segments``) or logits are soft-capped."""
        qpos = self.owner.positions.to(query.device)
        n = self.k.shape[1]
        kpos = torch.arange(n, device=query.device)
        allowed = self.filled[None, :] & (kpos[None, :] <= qpos[:, None])
        if sliding_window is not None:
            allowed &= kpos[None, :] > qpos[:, None] - sliding_window
        hq, hkv = query.shape[1], self.k.shape[0]
        record = self.owner.record_last
        seg = self.owner.segments
        if seg is None and softcap is None:
            # KV heads repeated (a masked SDPA with GQA can fall back to the math kernel) and
            # queries in blocks, bounding memory whichever kernel runs
            dtype = torch.float32 if query.device.type == "cpu" else query.dtype
            k = self.k.repeat_interleave(hq // hkv, 0)[None].to(dtype)
            v = self.v.repeat_interleave(hq // hkv, 0)[None].to(dtype)
            q = query.to(dtype)
            out = torch.empty_like(q)
            block = 2048
            for s in range(0, q.shape[2], block):
                out[:, :, s : s + block] = F.scaled_dot_product_attention(
                    q[:, :, s : s + block], k, v, attn_mask=allowed[None, None, s : s + block],
                    scale=scale,
                )  # fmt: skip
            if record:
                q_tail = query[0, :, -record:].float()
                self.rows = self._rows(q_tail, k[0].float(), allowed[-record:], scale)
            return out.to(query.dtype)
        k = self.k.repeat_interleave(hq // hkv, 0).float()
        v = self.v.repeat_interleave(hq // hkv, 0).float()
        q = query[0].float()
        out = torch.empty_like(q)
        if seg is not None:
            seg = seg.to(query.device)
            qseg = seg[qpos]
            other = (seg[None, :n] >= 0) & (seg[None, :n] != qseg[:, None])  # [Tq, n]
            self.outside = torch.empty(q.shape[1])
        block = 1024
        for s in range(0, q.shape[1], block):
            scores = q[:, s : s + block] @ k.transpose(1, 2) * scale  # [Hq, b, n]
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            scores = scores.masked_fill(~allowed[None, s : s + block], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            out[:, s : s + block] = probs @ v
            if seg is not None:
                mass = (probs * other[None, s : s + block]).sum(-1).mean(0)
                self.outside[s : s + block] = mass.cpu()
        if record:
            self.rows = self._rows(q[:, -record:], k, allowed[-record:], scale, softcap)
        return out[None].to(query.dtype)

    @staticmethod
    def _rows(q, k, allowed, scale, softcap=None) -> torch.Tensor:
        """Attention probabilities [Hq, Tq, n] of queries ``q`` over keys ``k`` (on the CPU)."""
        tail = q @ k.transpose(1, 2) * scale
        if softcap is not None:
            tail = torch.tanh(tail / softcap) * softcap
        tail = tail.masked_fill(~allowed[None], float("-inf"))
        return torch.softmax(tail, dim=-1).cpu()

    def get_seq_length(self) -> int:
        return 0 if self.filled is None else int(self.filled.sum())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0  # the mask is rebuilt in attend()

    def get_max_length(self) -> int:
        return -1


class ReuseCache(Cache):
    """Per-layer dense keys/values by position; see the module docstring."""

    def __init__(self, model) -> None:
        if model.config._attn_implementation != "kvlens":
            raise KvlensError("chunk reuse needs a model loaded by kvlens (attention 'kvlens')")
        self.facts = model_facts(model)
        super().__init__(layers=[ReuseLayer(self, i) for i in range(self.facts.n_layers)])
        self.positions = torch.empty(0, dtype=torch.long)
        self.stop_after: int | None = None
        self.record_last = 0
        #: per position, its segment (-1 header, chunk index, -2 question), or None
        self.segments: torch.Tensor | None = None

    def run(
        self,
        model,
        ids: list[int],
        positions: list[int] | torch.Tensor,
        *,
        stop_after: int | None = None,
        record_last: int = 0,
    ) -> torch.Tensor | None:
        """Run tokens ``ids`` at ``positions`` (increasing) through the model over this cache.

        Returns the next-token logits after the last token, or None when the call stopped
        after layer ``stop_after`` (whose fresh keys/values are then in ``layers[l].fresh``).
        ``record_last`` keeps the attention of the call's last queries in each layer's ``rows``.
        """
        device = next(model.parameters()).device
        pos = torch.as_tensor(positions, dtype=torch.long, device=device).reshape(-1)
        if pos.numel() != len(ids):
            raise KvlensError("give one position per token")
        if pos.numel() == 0:
            return None
        if pos.numel() > 1 and bool((pos[1:] <= pos[:-1]).any()):
            raise KvlensError("positions must increase")
        self.positions, self.stop_after, self.record_last = pos, stop_after, record_last
        batch = torch.tensor([list(ids)], device=device)
        try:
            with torch.inference_mode():
                out = model(input_ids=batch, position_ids=pos[None], **_cache(model, self),
                            use_cache=True, logits_to_keep=1)  # fmt: skip
        except StopForward:
            return None
        finally:
            self.stop_after, self.record_last = None, 0
        return out.logits[0, -1].float()

    def write(self, layer: int, positions: torch.Tensor, keys, values) -> None:
        lay = self.layers[layer]
        if not lay.is_initialized:
            lay.lazy_initialization(keys[None], values[None])
        lay.write(positions.to(lay.device), keys, values)

    def keys(self, layer: int) -> torch.Tensor:
        return self.layers[layer].k

    def values(self, layer: int) -> torch.Tensor:
        return self.layers[layer].v

    def to_dynamic(self) -> DynamicCache:
        """A DynamicCache holding the same tokens (every position must be filled)."""
        cache = DynamicCache()
        for i, lay in enumerate(self.layers):
            if not bool(lay.filled.all()):
                raise KvlensError(f"layer {i} has unfilled positions; cannot decode from it")
            cache.update(lay.k[None].clone(), lay.v[None].clone(), i)
        return cache


def _cache(model, cache) -> dict:
    from probes.compat import cache_arg

    return cache_arg(model, cache)
