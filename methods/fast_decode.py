"""Greedy decoding at the cost of its bytes: capacity buffers, lengths on the device, and the
whole step (every layer, the logits and the argmax) captured once in a CUDA graph and replayed.

The decode-step structure follows CUDA-graph serving (vLLM, SGLang; PyTorch's
``torch.cuda.graph``): a step must launch the same kernels on the same addresses every time,
so every layer holds buffers sized for the whole generation, the lengths the kernels read live
in device tensors that the step itself advances, and the host decides nothing from device
values (no ``.item()``, no lists of lengths). The attention of a step is one of the decode
kernels over the buffers: ``kvlens_kernels.sparse_decode`` (the full cache, all heads the same
length, and prefill-only eviction such as SnapKV, heads of their own lengths) or
``kvlens_kernels.quant_decode`` (KIVI and int8 codes plus their full-precision residual), launched
with a split plan fixed by the capacity.

What a step does is what the methods do on their eager kernel path (``methods.cache``):
prefill-only eviction changes nothing while decoding; a quantised store quantises its
residual's oldest groups after the step that overfills it, here run by the host between two
replays (it knows every length without asking the device). H2O and TOVA on their continuous
schedule (evict after every step) run their scoring on the device inside the step
(``EvictingLayer``): exact attention over a buffer of ``budget + 1`` rows, the method's score,
``torch.topk`` and a gather, the same operations in the same order as the eager statistics path
(``methods.cache`` with ``methods.eviction``); StreamingLLM's rolling window runs in the same
layer, ranked by position, attending through the sparse kernel. Other methods that read
attention statistics while decoding (Scissorhands, Keyformer) are refused.
Soft-capped layers are refused too (the kernels here take plain softmax). A sliding-window layer
of the full cache (Gemma 3's local layers) decodes from a ring of ``window`` rows
(``RingLayer``): token p in row p % window, so the rows held are exactly the tokens the layer's
window lets a step see (keys after (p - window, p], as transformers' masks and the eager
statistics path rule); compressed caches on sliding-window layers are refused.

Batch size 1. ``graph=False`` runs the same step eagerly (the test of the capture).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvlens_kernels.quant_decode import QuantKV, quant_decode_triton
from kvlens_kernels.sparse_decode import sparse_decode_reference, sparse_decode_triton
from methods.cache import CompressedCache, HeadStore
from methods.memory import element_bytes
from probes.attention import hand_over
from probes.compat import cache_arg, position_args
from probes.errors import KvlensError


class _DecodeLayer(CacheLayerMixin):
    """A layer whose decode step reads buffers through a kernel; the host keeps ``n_seen``."""

    is_sliding = False

    def __init__(self, layer_idx: int, n_seen: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_seen = n_seen
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers come built
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[2] != 1:
            raise KvlensError("a fast decoder takes one token per step")
        self.append(key_states[0, :, 0], value_states[0, :, 0])
        hand_over(self)
        return key_states, value_states  # placeholders: attention reads the buffers

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_mask_sizes(self, *args) -> tuple[int, int]:
        return self.n_seen + 1, 0  # the kernels need no mask

    def get_max_length(self) -> int:
        return -1

    def after_step(self) -> None:
        """Host bookkeeping after a step has been launched (no device read)."""
        self.n_seen += 1

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        raise NotImplementedError

    def attend(self, query, key, value, *, scale: float, sliding_window=None, softcap=None):
        raise NotImplementedError


def _plain(sliding_window, softcap) -> None:
    """Refuse layers whose attention is not plain softmax over every held row."""
    if sliding_window is not None or softcap is not None:
        raise KvlensError(
            "the fast decoder attends over every held row: models with sliding-window or "
            "soft-capped attention layers decode through methods.cache instead"
        )


class SparseLayer(_DecodeLayer):
    """Keys/values [1, Hkv, C, D]; KV head h holds rows [0, lengths[0, h]) (int32, device)."""

    def __init__(self, keys, values, lengths, layer_idx: int, n_seen: int, positions=False):
        super().__init__(layer_idx, n_seen)
        self.keys, self.values, self.lengths = keys, values, lengths
        self._heads = torch.arange(keys.shape[1], device=keys.device)
        #: whether the bytes count an int32 position per token (an evicted cache's, which
        #: must say which tokens it kept; the full cache's positions are its row numbers)
        self.positions = positions
        #: bytes per token of the method's per-token state that the store it came from held
        #: (``HeadStore`` counts them; prefill-only eviction no longer updates them)
        self.state_bytes = 0

    @classmethod
    def from_rows(cls, keys, values, lengths, layer_idx, n_seen, new: int, positions=False):
        """Buffers with room for ``new`` more tokens from per-head [Hkv, >=L_h, D] rows."""
        hkv, _, d = keys.shape
        cap = max(lengths) + new
        k = keys.new_zeros(1, hkv, cap, d)
        v = values.new_zeros(1, hkv, cap, d)
        for h, n in enumerate(lengths):
            k[0, h, :n], v[0, h, :n] = keys[h, :n], values[h, :n]
        lens = torch.tensor([lengths], dtype=torch.int32, device=keys.device)
        return cls(k, v, lens, layer_idx, n_seen, positions)

    def nbytes(self) -> int:
        """Serving bytes of the rows in use (``methods.memory``); reads the lengths."""
        per_token = 2 * self.keys.shape[3] * element_bytes(self.keys.dtype)
        per_token += element_bytes(torch.int32) if self.positions else 0
        return int(self.lengths.sum()) * (per_token + self.state_bytes)

    def kept(self) -> list[int]:
        """Tokens each KV head holds (reads the lengths)."""
        return self.lengths[0].tolist()

    def append(self, key, value) -> None:
        index = (self._heads, self.lengths[0].long())
        self.keys[0].index_put_(index, key)
        self.values[0].index_put_(index, value)
        self.lengths += 1

    def _check(self, sliding_window, softcap) -> None:
        _plain(sliding_window, softcap)

    def attend(self, query, key, value, *, scale: float, sliding_window=None, softcap=None):
        self._check(sliding_window, softcap)
        if not self.keys.is_cuda:  # a CPU step (graph=False) reads the same rows exactly
            out = sparse_decode_reference(
                query[:, :, 0], self.keys, self.values, self.lengths, scale=scale
            )
            return out[:, :, None]
        out = sparse_decode_triton(
            query[:, :, 0], self.keys, self.values, self.lengths,
            scale=scale, max_length=self.keys.shape[2],
        )  # fmt: skip
        return out[:, :, None]


class RingLayer(SparseLayer):
    """A sliding-window layer of the full cache: the last ``window`` tokens in ``window`` rows,
    token p in row p % window (the write row lives on the device); a step attends over every
    held row, which are the tokens its window sees."""

    def __init__(self, keys, values, lengths, layer_idx: int, n_seen: int, window: int):
        super().__init__(keys, values, lengths, layer_idx, n_seen)
        self.window = window
        self.slot = torch.full((1,), n_seen % window, dtype=torch.long, device=keys.device)

    @classmethod
    def from_tokens(cls, keys, values, layer_idx: int, window: int, n_seen: int | None = None):
        """The ring after a prefill from the keys/values [Hkv, m, D] of the last m of the
        ``n_seen`` tokens seen (default m: all of them; transformers' own sliding layers keep
        window - 1): the last window - 1 of them (the next token completes the window)."""
        hkv, m, d = keys.shape
        n = m if n_seen is None else n_seen
        held = min(m, n, window - 1)
        keys, values = keys[:, m - held :], values[:, m - held :]
        rows = torch.arange(n - held, n, device=keys.device) % window
        k = keys.new_zeros(1, hkv, window, d)
        v = values.new_zeros(1, hkv, window, d)
        k[0, :, rows], v[0, :, rows] = keys, values
        lens = torch.full((1, hkv), held, dtype=torch.int32, device=keys.device)
        return cls(k, v, lens, layer_idx, n, window)

    def _check(self, sliding_window, softcap) -> None:
        if sliding_window != self.window or softcap is not None:
            raise KvlensError(
                f"a ring of {self.window} rows serves a sliding window of {self.window} "
                f"without soft-capping, not window {sliding_window}, softcap {softcap}"
            )

    def append(self, key, value) -> None:
        # before the first append of a full window one row is free: the write row's; after
        # it every row is held, so the held rows are always [0, lengths)
        index = (self._heads, self.slot.expand(self._heads.shape[0]))
        self.keys[0].index_put_(index, key)
        self.values[0].index_put_(index, value)
        self.slot.add_(1).remainder_(self.window)
        self.lengths.add_(1).clamp_(max=self.window)


class QuantLayer(_DecodeLayer):
    """A ``QuantHeadStore`` read by the quantised kernel with its lengths on the device; the
    store's buffers are reserved for the whole generation, so quantising keeps addresses."""

    def __init__(self, store, layer_idx: int, n_seen: int, new: int) -> None:
        super().__init__(layer_idx, n_seen)
        self.store = store
        self.capacity = store.reserve(new)  # (quantised, residual) tokens
        self.lengths = torch.zeros(2, dtype=torch.int32, device=store.device)
        self._sync_lengths()

    def _sync_lengths(self) -> None:
        self.lengths[0].fill_(self.store.n_quant)  # fills: launches, no host copy
        self.lengths[1].fill_(self.store.n_residual)

    def append(self, key, value) -> None:
        r = self.lengths[1].long()[None]
        self.store._rk.index_copy_(1, r, key[:, None])
        self.store._rv.index_copy_(1, r, value[:, None])
        self.lengths[1] += 1

    def attend(self, query, key, value, *, scale: float, sliding_window=None, softcap=None):
        _plain(sliding_window, softcap)
        s = self.store
        quant, res = self.capacity
        layout = QuantKV(
            s._kc[None], s._ks[None], s._kz[None], s._vc[None], s._vs[None], s._vz[None],
            s._rk[None], s._rv[None], n_quant=quant, n_residual=res,
            key_bits=s.key_bits, value_bits=s.value_bits, group=s.group,
            key_per_channel=s.key_grouping == "channel",
        )  # fmt: skip
        out = quant_decode_triton(query[:, :, 0], layout, scale=scale, lengths=self.lengths)
        return out[:, :, None]

    def nbytes(self) -> int:
        return self.store.nbytes()

    def kept(self) -> list[int]:
        """Tokens each KV head holds (the store's host counts)."""
        return self.store.lengths()

    def after_step(self) -> None:
        super().after_step()
        self.store.n_residual += 1
        before = self.store.n_quant
        self.store.flush()  # what KIVI's compress does after each call; outside the graph
        if self.store.n_quant != before:
            self._sync_lengths()


class EvictingLayer(_DecodeLayer):
    """H2O, TOVA or StreamingLLM evicting after every step, ranked on the device (Zhang et al.
    2023, "H2O: Heavy-Hitter Oracle"; Oren et al. 2024, "Transformers are Multi-State RNNs";
    Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks").

    Buffers [Hkv, budget + 1, D] hold the kept rows in position order, every head the same
    number (``lengths``, a device scalar, as are the tokens seen). A step writes its token to
    row ``lengths`` and attends over the rows in use: H2O and TOVA exactly in float32 as the
    eager statistics path does (they read the attention), StreamingLLM through the sparse decode
    kernel as its eager path does. The rows are then ranked as ``methods.eviction`` ranks them
    (H2O's accumulated attention, TOVA's last attention, StreamingLLM's positions; protected
    sinks and recent rows first) and the ``budget`` best kept in position order:
    ``torch.topk`` then a sorted gather. Rows past the ones in use rank below every real row,
    so a cache still under its budget keeps everything.
    """

    def __init__(self, store: HeadStore, method, layer_idx: int, n_seen: int) -> None:
        from methods.eviction.h2o import H2O
        from methods.eviction.streamingllm import StreamingLLM

        super().__init__(layer_idx, n_seen)
        held = store.lengths()
        hkv, _, d = store._keys.shape
        self.method, self.budget, self.h2o = method, method.budget, isinstance(method, H2O)
        self.streaming = isinstance(method, StreamingLLM)
        cap = self.budget + 1
        n = held[0]
        self.keys = store._keys.new_zeros(hkv, cap, d)
        self.values = store._values.new_zeros(hkv, cap, d)
        self.positions = store._positions.new_zeros(hkv, cap)
        self.score = torch.zeros(hkv, cap, dtype=torch.float32, device=store._keys.device)
        self.keys[:, :n], self.values[:, :n] = store._keys[:, :n], store._values[:, :n]
        self.positions[:, :n] = store._positions[:, :n]
        if self.h2o and "h2o_score" in store._aux:
            self.score[:, :n] = store._aux["h2o_score"][:, :n]
        device = self.keys.device
        self.lengths = torch.tensor(n, dtype=torch.int64, device=device)
        self.seen = torch.tensor(n_seen, dtype=torch.int64, device=device)
        self._rows = torch.arange(cap, device=device)
        self._neg = torch.tensor(-1e30, device=device)  # the eager path's masked logit

    def append(self, key, value) -> None:
        row = self.lengths[None]
        self.keys.index_copy_(1, row, key[:, None])
        self.values.index_copy_(1, row, value[:, None])
        here = self.seen.to(self.positions.dtype).expand(self.positions.shape[0], 1)
        self.positions.index_copy_(1, row, here)
        self.score.index_fill_(1, row, 0.0)
        self.lengths += 1
        self.seen += 1

    def attend(self, query, key, value, *, scale: float, sliding_window=None, softcap=None):
        _plain(sliding_window, softcap)
        q = query[0, :, 0]  # [Hq, D]
        hkv, cap, d = self.keys.shape
        hq = q.shape[0]
        in_use = self._rows < self.lengths  # [cap]
        if self.streaming:  # reads no attention: the kernel of its eager decode path
            lengths = self.lengths.to(torch.int32).expand(1, hkv).contiguous()  # the kernel's
            if self.keys.is_cuda:
                out = sparse_decode_triton(
                    q[None], self.keys[None], self.values[None], lengths,
                    scale=scale, max_length=cap,
                )  # fmt: skip
            else:
                out = sparse_decode_reference(
                    q[None], self.keys[None], self.values[None], lengths, scale=scale
                )
            self._evict(None, in_use)
            return out[0].to(query.dtype)[None, :, None]
        s = torch.bmm(
            (q.float() * scale).view(hkv, hq // hkv, d), self.keys.float().transpose(1, 2)
        )
        s = torch.where(in_use, s, self._neg)
        s.sub_(s.amax(-1, keepdim=True))
        p = torch.exp(s)
        p.div_(p.sum(-1, keepdim=True))  # [Hkv, G, cap]
        out = torch.bmm(p, self.values.float()).view(hq, d)
        self._evict(p, in_use)
        return out.to(query.dtype)[None, :, None]

    def _ranking(self, p: torch.Tensor) -> torch.Tensor:
        """Float [Hkv, cap]: the method's score of every row (higher keeps)."""
        m = self.method
        if self.streaming:  # keep the sinks and the recent window, then the latest positions
            pos = self.positions.to(torch.int64)
            guard = (pos >= self.seen - (m.budget - m.sinks)) | (pos < m.sinks)
            return torch.where(guard, 1e30 + pos.float(), pos.float())
        if self.h2o:
            self.score += p.mean(1)
            if m.normalise == "sum":
                score = self.score.clone()
            else:
                seen_by = (self.seen - self.positions.to(torch.int64)).clamp_min(1)
                score = self.score / seen_by.float()
            if m.n_recent:
                pos = self.positions.to(torch.int64)
                guard = pos >= self.seen - m.n_recent
                score = torch.where(guard, 1e30 + pos.float(), score)
            return score
        if m.average == "group":
            return p.mean(1)
        return p.reshape(-1, p.shape[-1]).mean(0).expand(p.shape[0], -1)

    def _evict(self, p: torch.Tensor, in_use: torch.Tensor) -> None:
        score = torch.where(in_use, self._ranking(p), float("-inf"))
        keep = torch.topk(score, self.budget, dim=-1, sorted=False).indices.sort(-1).values
        d = self.keys.shape[2]
        rows = keep[..., None].expand(-1, -1, d)
        self.keys[:, : self.budget] = self.keys.gather(1, rows)
        self.values[:, : self.budget] = self.values.gather(1, rows)
        self.positions[:, : self.budget] = self.positions.gather(1, keep)
        self.score[:, : self.budget] = self.score.gather(1, keep)
        self.lengths.clamp_(max=self.budget)

    def nbytes(self) -> int:
        """Serving bytes as ``HeadStore`` counts them (reads the length from the device)."""
        per_token = 2 * self.keys.shape[2] * element_bytes(self.keys.dtype)
        per_token += element_bytes(self.positions.dtype)
        per_token += element_bytes(self.score.dtype) if self.h2o else 0
        return int(self.lengths) * self.keys.shape[0] * per_token

    def kept(self) -> list[int]:
        """Tokens each KV head holds (every head the same; reads the length)."""
        return [int(self.lengths)] * self.keys.shape[0]


class DecodeCache(Cache):
    """The cache a fast decoder's model steps run on: one ``_DecodeLayer`` per layer."""

    def __init__(self, layers: list[_DecodeLayer]) -> None:
        super().__init__(layers=layers)


def _continuous(method) -> bool:
    """H2O, TOVA or StreamingLLM evicting after every step, every head at one budget
    (``EvictingLayer``)."""
    from methods.eviction.h2o import H2O
    from methods.eviction.streamingllm import StreamingLLM
    from methods.eviction.tova import TOVA

    if type(method) is StreamingLLM:
        return True
    return type(method) in (H2O, TOVA) and method.schedule == "continuous"


def eligible(cache: CompressedCache) -> None:
    """Raise a one-line KvlensError unless the fast decoder can take ``cache``'s method."""
    from methods.eviction.base import EvictionMethod
    from methods.quantization.int8 import Int8
    from methods.quantization.kivi import KIVI
    from methods.quantization.store import QuantHeadStore

    method, store = cache.method, cache.layers[0].store
    quantised = isinstance(method, KIVI | Int8) and type(store) is QuantHeadStore
    evicted = (
        isinstance(method, EvictionMethod)
        and not method.evict_while_decoding
        and not method.decode_needs_attention
        and type(store) is HeadStore
    )
    kernels = all(layer.decodes_from_store() for layer in cache.layers)
    continuous = _continuous(method) and all(
        type(layer.store) is HeadStore and len(set(layer.store.lengths())) == 1
        for layer in cache.layers
    )
    if quantised and store.device.type != "cuda":
        raise KvlensError(f"{method.spec()}: the fast decoder's quantised step runs on CUDA")
    if not ((quantised or evicted) and kernels or continuous):
        raise KvlensError(
            f"{method.spec()}: the fast decoder takes quantised caches (KIVI, int8), eviction "
            "that only compresses the prefill, and H2O or TOVA evicting at every step"
        )


def layer_windows(model) -> list[int | None]:
    """Per attention layer of ``model``: its sliding window, or None where it attends over
    every token (config ``layer_types``, else one ``sliding_window`` for all layers)."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    n = int(cfg.num_hidden_layers)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    types = getattr(cfg, "layer_types", None)
    if not types:
        return [window] * n
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise KvlensError(
            f"the fast decoder takes full and sliding attention layers, not {unknown}"
        )
    return [window if t == "sliding_attention" else None for t in types]


def decode_layers(cache, new: int, windows: list[int | None] | None = None) -> list[_DecodeLayer]:
    """Decode layers with room for ``new`` tokens from a prefilled cache: a transformers
    ``DynamicCache`` (the full cache; ``windows[i]``, where given and not None, makes layer i a
    sliding-window ring, see ``layer_windows``) or an eligible ``CompressedCache`` (its stores
    move)."""
    if isinstance(cache, CompressedCache):
        eligible(cache)
        layers = []
        for i, layer in enumerate(cache.layers):
            store = layer.store
            if _continuous(cache.method):
                layers.append(EvictingLayer(store, cache.method, i, layer.n_seen))
            elif isinstance(store, HeadStore):
                sparse = SparseLayer.from_rows(
                    store._keys, store._values, store.lengths(), i, layer.n_seen, new, True
                )
                sparse.state_bytes = sum(element_bytes(b.dtype) for b in store._aux.values())
                layers.append(sparse)
            else:
                layers.append(QuantLayer(store, i, layer.n_seen, new))
        return layers
    layers = []
    for i, layer in enumerate(cache.layers):  # DynamicCache: keys/values [1, Hkv, T, D]
        t = layer.keys.shape[2]
        if windows is not None and windows[i] is not None:
            ring = RingLayer.from_tokens(
                layer.keys[0], layer.values[0], i, windows[i], layer.get_seq_length()
            )
            layers.append(ring)
            continue
        layers.append(
            SparseLayer.from_rows(
                layer.keys[0], layer.values[0], [t] * layer.keys.shape[1], i, t, new
            )
        )
    return layers


class FastDecoder:
    """Greedy decoding of ``model`` over ``layers``, one step per replay of a CUDA graph."""

    def __init__(self, model, layers: list[_DecodeLayer], graph: bool = True) -> None:
        self.model, self.layers, self.graph = model, layers, graph
        self.cache = DecodeCache(layers)
        device = layers[0].lengths.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.full((1, 1), layers[0].n_seen, dtype=torch.long, device=device)
        #: float32 next-token logits of the last step (one buffer, rewritten by every step)
        self.logits: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    def nbytes(self) -> int:
        """Bytes the layers hold now (reads lengths from the device: not for the hot path)."""
        return sum(layer.nbytes() for layer in self.layers)

    def _step(self) -> None:
        out = self.model(
            input_ids=self.token, **position_args(self.model, self.position),
            **cache_arg(self.model, self.cache), use_cache=True, logits_to_keep=1,
        )  # fmt: skip
        last = out.logits[0, -1]
        if self.logits is None:  # the first, eager step allocates the buffer the graph writes
            self.logits = torch.empty(last.shape, dtype=torch.float32, device=last.device)
        self.logits.copy_(last)
        self.token.copy_(last.argmax(-1)[None, None])
        self.position += 1

    def _after_step(self) -> None:
        for layer in self.layers:
            layer.after_step()

    def _run_step(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        elif self.graph:  # first step: eager on a side stream (compiles), then capture
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step()
            torch.cuda.current_stream().wait_stream(stream)
            self._after_step()
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):  # records, runs nothing
                self._step()
            return
        else:
            self._step()
        self._after_step()

    def step(self, token: int) -> torch.Tensor:
        """Feed ``token``; the float32 next-token logits after it (the decoder's buffer: the
        next step rewrites it)."""
        self.token.fill_(token)
        self._run_step()
        return self.logits

    def kept(self) -> list[list[int]]:
        """Tokens each layer's KV heads hold (reads lengths from the device)."""
        return [layer.kept() for layer in self.layers]

    def generate(self, first: torch.Tensor, steps: int) -> torch.Tensor:
        """Tokens [steps] following ``first`` ([1, 1], the prefill's argmax), greedy."""
        tokens = torch.empty(steps, dtype=torch.long, device=self.token.device)
        self.token.copy_(first)
        for i in range(steps):
            self._run_step()
            tokens[i : i + 1].copy_(self.token[0])
        return tokens
