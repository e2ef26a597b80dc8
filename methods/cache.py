"""The compressed cache: a transformers ``Cache`` whose layers hold only what a method kept.

``CompressedCache(model, method)`` goes to ``model.generate(cache=...)`` or to a
forward call unchanged. Each layer keeps, per KV head, its own tensors of the kept tokens
(``[L_h, head_dim]`` keys and values, int32 positions, and any per-token state the method
needs), so heads may keep different numbers of tokens and the bytes reported are the bytes
held: nothing is masked, nothing is repeated per query head.

How a call flows: the model calls ``update`` with the new keys/values; the layer hands itself
to kvlens' attention function (``probes.attention.hand_over``), which calls ``attend``. There
the new tokens are appended, attention is computed over the stored tokens (exact, with the
statistics the method asks for), and the method compresses the store from the
``Observation``. ``get_seq_length`` reports the tokens *seen*, so RoPE positions stay right
after eviction. Only the first multi-token call is the method's prefill: later chunks (a
question appended to a compressed context) are treated like decoding steps, as in serving.
Batch size 1.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvlens_kernels.attention_stats import (
    attention_stats_reference,
    attention_with_stats,
    decode_attention_reference,
)
from kvlens_kernels.sparse_decode import sparse_decode
from kvlens_kernels.split_decode import head_products
from methods.base import DecodeStep, Method, Observation
from methods.memory import element_bytes
from probes.attention import hand_over
from probes.errors import KvlensError
from probes.models import model_facts


class HeadStore:
    """Per-KV-head storage of kept tokens: keys, values, positions and method state.

    Held in capacity buffers [Hkv, C, ...] (grown by doubling, shrunk after eviction) where
    head h uses rows [0, length_h): the layout ``kvlens_kernels.sparse_decode`` reads directly.
    ``keys[h]`` etc. are views of those rows, so in-place edits (merging) land in the store.
    Bytes reported are those of the rows in use.
    """

    supports_decode = True  # ``decode`` reads the buffers with kvlens_kernels.sparse_decode

    def __init__(self, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        self._keys = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self._values = torch.empty_like(self._keys)
        self._positions = torch.empty(n_kv_heads, 0, dtype=torch.int32, device=device)
        self._aux: dict[str, torch.Tensor] = {}
        self._lengths = [0] * n_kv_heads
        self._lengths_device: torch.Tensor | None = None  # kept in step for the decode kernel

    @property
    def n_heads(self) -> int:
        return len(self._lengths)

    def lengths(self) -> list[int]:
        return list(self._lengths)

    def _views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        return [buf[h, :n] for h, n in enumerate(self._lengths)]

    @property
    def keys(self) -> list[torch.Tensor]:
        return self._views(self._keys)

    @property
    def values(self) -> list[torch.Tensor]:
        return self._views(self._values)

    @property
    def positions(self) -> list[torch.Tensor]:
        return self._views(self._positions)

    @property
    def aux(self) -> dict[str, list[torch.Tensor]]:
        return {name: self._views(buf) for name, buf in self._aux.items()}

    def _resize(self, capacity: int) -> None:
        def moved(buf: torch.Tensor) -> torch.Tensor:
            out = buf.new_zeros(buf.shape[0], capacity, *buf.shape[2:])
            n = min(capacity, buf.shape[1])
            out[:, :n] = buf[:, :n]
            return out

        self._keys, self._values = moved(self._keys), moved(self._values)
        self._positions = moved(self._positions)
        self._aux = {name: moved(buf) for name, buf in self._aux.items()}

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """keys/values [Hkv, T, D]; positions [T]."""
        t = keys.shape[1]
        need = max(self._lengths) + t
        if need > self._keys.shape[1]:
            self._resize(max(need, 2 * self._keys.shape[1]))
        pos = positions.to(torch.int32)
        if len(set(self._lengths)) == 1:  # every head the same length: one copy per tensor
            n = self._lengths[0]
            self._keys[:, n : n + t] = keys
            self._values[:, n : n + t] = values
            self._positions[:, n : n + t] = pos
            for buf in self._aux.values():
                buf[:, n : n + t] = 0
        else:
            for h, n in enumerate(self._lengths):
                self._keys[h, n : n + t] = keys[h]
                self._values[h, n : n + t] = values[h]
                self._positions[h, n : n + t] = pos
                for buf in self._aux.values():
                    buf[h, n : n + t] = 0
        self._lengths = [n + t for n in self._lengths]
        if self._lengths_device is not None:
            self._lengths_device += t

    def aux_state(self, name: str, dtype=torch.float32) -> list[torch.Tensor]:
        """Per-token method state (zero for new tokens), gathered with the tokens on eviction."""
        if name not in self._aux:
            self._aux[name] = torch.zeros(
                self._positions.shape, dtype=dtype, device=self._positions.device
            )
        return self._views(self._aux[name])

    def keep(self, head: int, index: torch.Tensor) -> None:
        """Keep only the tokens at ``index`` (any order; stored in position order)."""
        index = index.sort().values.to(self._keys.device)
        m = index.numel()
        for buf in (self._keys, self._values, self._positions, *self._aux.values()):
            buf[head, :m] = buf[head, index]  # the gather copies before the rows are written
        self._lengths[head] = m
        self._lengths_device = None

    def keep_heads(self, indices: dict[int, torch.Tensor]) -> None:
        """``keep`` for several heads (head -> index). When every head keeps the same number
        of tokens, each buffer is gathered once for all heads (the rows ``keep`` writes head by
        head: a decoding step of a continuous eviction evicts every head to one budget)."""
        counts = {int(index.numel()) for index in indices.values()}
        if sorted(indices) != list(range(self.n_heads)) or len(counts) != 1:
            for head, index in indices.items():
                self.keep(head, index)
            return
        m = counts.pop()
        order = torch.stack([indices[h] for h in range(self.n_heads)]).to(self._keys.device)
        order = order.sort(dim=1).values
        for buf in (self._keys, self._values, self._positions, *self._aux.values()):
            _gather_rows(buf, order)
        self._lengths = [m] * self.n_heads
        self._lengths_device = None

    def shrink(self) -> None:
        """Give back capacity far beyond the longest head (after an eviction at prefill)."""
        longest = max(self._lengths)
        if self._keys.shape[1] > 2 * longest + 256:
            self._resize(longest + 256)

    def decode(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of one token's queries [Hq, D] over the kept rows (sparse decode)."""
        if self._lengths_device is None:
            self._lengths_device = torch.tensor(
                [self._lengths], dtype=torch.int32, device=query.device
            )
        return sparse_decode(
            query[None], self._keys[None], self._values[None], self._lengths_device,
            scale=scale, max_length=max(self._lengths),
        )[0]  # fmt: skip

    def nbytes(self) -> int:
        """Serving bytes of the rows in use (``methods.memory``): keys, values, int32
        positions and per-token state."""
        per_token = 2 * self._keys.shape[2] * element_bytes(self._keys.dtype)
        per_token += element_bytes(self._positions.dtype)
        per_token += sum(element_bytes(buf.dtype) for buf in self._aux.values())
        return sum(self._lengths) * per_token


def _gather_rows(buf: torch.Tensor, order: torch.Tensor) -> None:
    """In ``buf`` [H, C, ...], move head h's rows ``order[h]`` (``order`` [H, m]) to [0, m)."""
    index = order.view(*order.shape, *[1] * (buf.dim() - 2)).expand(*order.shape, *buf.shape[2:])
    buf[:, : order.shape[1]] = torch.gather(buf, 1, index)  # gathered before rows are written


class CompressedLayer(CacheLayerMixin):
    """One layer of a CompressedCache."""

    is_sliding = False

    def __init__(self, method: Method, layer_idx: int, n_layers: int) -> None:
        super().__init__()
        self.method = method
        self.layer_idx = layer_idx
        self.n_layers = n_layers
        self.store: HeadStore | None = None
        self.n_seen = 0
        self.prefilled = False
        self.prefill_compressions = 0
        #: X-ray log, one entry per attention call: (tokens seen after the call, query count,
        #: positions each KV head's queries attended over, positions kept after compression)
        self.history: list[tuple[int, int, list[torch.Tensor], list[torch.Tensor]]] = []
        self.record_history = False
        #: decode steps through the store's kernel where the method allows (False: always
        #: the statistics path, e.g. to compare the two)
        self.use_decode_kernels = True
        #: statistics-path decode steps attend for every KV head in one batched call when the
        #: heads hold the same number of tokens (False: one head at a time, e.g. to compare)
        self.batch_heads = True
        #: per decoding step of a selecting method (sparse family): bytes read by the
        #: selection, from the device store and from host memory
        self.reads: list[tuple[int, int, int]] = []
        #: with record_history, per such step: (tokens seen, queries [Hq, D] float32 on the
        #: CPU, rows each KV head read, rows each held) for the attention-recall analysis
        self.selections: list[tuple[int, torch.Tensor, list[torch.Tensor], list[int]]] = []
        self.scale: float | None = None  # the attention scale those steps ran with

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store = self.method.new_store(
            key_states.shape[1], key_states.shape[-1], self.dtype, self.device
        )
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise KvlensError("compressed caches run one sequence at a time (batch size 1)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        hand_over(self)
        return key_states, value_states  # placeholders: attention reads the store via attend()

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n_seen + query_length, 0  # the mask is rebuilt from positions in attend()

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return 0 if self.store is None else self.store.nbytes()

    def attend(
        self,
        query,
        key,
        value,
        *,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ):
        """Append this call's tokens, attend over the store, let the method compress it.
        ``softcap`` caps the logits as the model does (Gemma 2: cap * tanh(s / cap))."""
        store = self.store
        hq, tq = query.shape[1], query.shape[2]
        group = hq // store.n_heads
        new_pos = torch.arange(self.n_seen, self.n_seen + tq, device=query.device)
        store.append(key[0], value[0], new_pos)
        if tq == 1 and self.selects_now(sliding_window, softcap):
            return self._sparse_step(query, scale)
        if tq == 1 and sliding_window is None and softcap is None and self.decodes_from_store():
            return self._decode_step(query, scale)
        window = max(1, min(tq, self.method.observation_window()))
        out = torch.empty_like(query)
        received, win, last, window_queries = [], [], [], []
        # read once per call: encoded and quantised stores rebuild these on every read
        all_keys, all_values = store.keys, store.values
        all_pos = [p.to(torch.int64) for p in store.positions]
        # a store may weight its tokens in the logits (a merged centroid of n tokens adds
        # log n: methods.merging.kvcluster); read on every call after the first
        bias = store.logit_bias() if hasattr(store, "logit_bias") else None
        first_call = self.n_seen == 0
        whole = None  # (received, window) of every query head, where one call covers all heads
        last_rows = None  # the last query's attention [Hq, L], where one product covers all heads
        if first_call:
            # every head holds the whole causal prompt: one dispatched call (the Triton
            # statistics kernels on CUDA) covers all heads
            stacked_keys = torch.stack(all_keys)
            if tq > 1:
                last_rows = _last_rows(query[0, :, -1], stacked_keys, scale, softcap)
            o, stats = attention_with_stats(
                query[0],
                stacked_keys,
                torch.stack(all_values),
                scale=scale,
                window=window,
                sliding_window=sliding_window,
                softcap=softcap,
                per_row=False,  # methods read the columns (received, window) only
            )
            out[0] = o
            whole = stats.received, stats.window
        elif (
            tq == 1
            and self.batch_heads
            and sliding_window is None
            and bias is None
            and len({k.shape[0] for k in all_keys}) == 1
        ):
            # a decoding step whose heads hold the same number of tokens: its query sees every
            # stored position, so one batched call gives every head's output and attention row
            # (the per-head path's numbers at the embedded models' shapes, else within float32
            # rounding; that path also computes row statistics no method reads while decoding)
            o, probs = decode_attention_reference(
                query[0],
                torch.stack(all_keys),
                torch.stack(all_values),
                scale=scale,
                softcap=softcap,
            )
            out[0] = o
            whole = probs, probs  # one query: its window is the whole call
        for h in range(store.n_heads):
            rows = slice(h * group, (h + 1) * group)
            q_h = query[0, rows]  # [G, Tq, D]
            if whole is not None:
                head_received, head_window = whole[0][rows], whole[1][rows]
            else:  # kept positions are no longer 0..n-1: the causal rule comes as a mask
                pos = all_pos[h]
                allowed = pos[None, :] <= new_pos[:, None]
                if sliding_window is not None:
                    allowed &= pos[None, :] > new_pos[:, None] - sliding_window
                mask = allowed
                if bias is not None:  # additive: the bias where allowed, -inf elsewhere
                    mask = torch.where(allowed, bias[h].float()[None, :], float("-inf"))
                o, st = attention_stats_reference(
                    q_h, all_keys[h][None], all_values[h][None],
                    scale=scale, window=window, mask=mask, softcap=softcap,
                )  # fmt: skip
                out[0, rows] = o
                head_received, head_window = st.received, st.window
            received.append(head_received)
            win.append(head_window)
            if tq == 1:
                last.append(head_received)
            elif last_rows is not None:
                last.append(last_rows[rows])
            else:
                last.append(_last_rows(q_h[:, -1], all_keys[h][None], scale, softcap))
            window_queries.append(q_h[:, -window:])
        self.n_seen += tq
        attended = [p.cpu() for p in all_pos] if self.record_history else []
        if self.method.selects and self.prefilled and tq == 1:  # a layer it cannot select in
            self.reads.append((0, *store.read_nbytes(None)))  # every row held is read
        obs = Observation(
            layer=self.layer_idx,
            n_layers=self.n_layers,
            prefill=not self.prefilled and tq > 1,
            n_queries=tq,
            n_seen=self.n_seen,
            scale=scale,
            positions=all_pos,
            keys=all_keys,
            received=received,
            window=win,
            last=last,
            window_queries=window_queries,
        )
        self._compress(obs, attended)
        return out

    def _compress(self, obs: Observation, attended: list[torch.Tensor]) -> None:
        """Hand the call's Observation to the method, then keep the X-ray log."""
        self.method.compress(self.store, obs)
        if obs.prefill and hasattr(self.store, "shrink"):
            self.store.shrink()  # an eviction at prefill frees most of the capacity
        self.prefill_compressions += int(obs.prefill)
        self.prefilled = True
        if self.record_history:
            kept = [p.to(torch.int64).cpu() for p in self.store.positions]
            self.history.append((self.n_seen, obs.n_queries, attended, kept))

    def selects_now(self, sliding_window: int | None, softcap: float | None) -> bool:
        """A decoding step of a selecting method reads only the rows the method selects;
        sliding-window and soft-capped layers attend in full (their window is the selection)."""
        return self.method.selects and self.prefilled and sliding_window is None and softcap is None

    def _sparse_step(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """One decoding token of the sparse family: the method selects rows per KV head, the
        store attends exactly over just those (``kvlens_kernels.page_decode``), the rest of
        the cache is untouched; the X-ray log records the positions read."""
        store = self.store
        q = query[0, :, 0]  # [Hq, D]
        self.n_seen += 1
        self.scale = scale
        step = DecodeStep(
            self.layer_idx, self.n_layers, self.n_seen, scale, q, q.shape[0] // store.n_heads
        )
        selection = self.method.select(store, step)
        out = store.attend_selected(q, selection, scale)
        self.reads.append((selection.select_bytes, *store.read_nbytes(selection)))
        positions = store.positions
        attended = []
        if self.record_history:
            lengths = store.lengths()
            rows = [selection.rows(h, n).cpu() for h, n in enumerate(lengths)]
            attended = [positions[h].to(torch.int64).cpu()[r] for h, r in enumerate(rows)]
            self.selections.append((self.n_seen, q.float().cpu(), rows, lengths))
        obs = Observation(
            layer=self.layer_idx,
            n_layers=self.n_layers,
            prefill=False,
            n_queries=1,
            n_seen=self.n_seen,
            scale=scale,
            positions=positions,
            keys=None,
            received=None,
            window=None,
            last=None,
            window_queries=None,
        )
        self._compress(obs, attended)
        return out.to(query.dtype)[None, :, None]

    def decodes_from_store(self) -> bool:
        """Decode steps read the store through its decode kernel (sparse or quantised) when
        the method needs no attention statistics while decoding and the store can."""
        return (
            self.use_decode_kernels
            and not self.method.decode_needs_attention
            and getattr(self.store, "supports_decode", False)
        )

    def _decode_step(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """One decoding token: attention by the store's kernel, then the method sees positions
        only (the statistics fields of its Observation are None)."""
        store = self.store
        out = store.decode(query[0, :, 0], scale)[None, :, None]
        self.n_seen += 1
        positions = store.positions  # int32 views: no conversion on the per-token path
        attended = [p.to(torch.int64).cpu() for p in positions] if self.record_history else []
        obs = Observation(
            layer=self.layer_idx,
            n_layers=self.n_layers,
            prefill=False,
            n_queries=1,
            n_seen=self.n_seen,
            scale=scale,
            positions=positions,
            keys=None,
            received=None,
            window=None,
            last=None,
            window_queries=None,
        )
        self._compress(obs, attended)
        return out.to(query.dtype)


def _last_rows(
    q_last: torch.Tensor, keys: torch.Tensor, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """Attention of the last query (which sees every stored token) of each query head,
    q_last [Hq, D], over KV heads of one length, keys [Hkv, L, D]: [Hq, L]. One batched
    product, per head the numbers of ``q @ k.T`` (``split_decode.head_products``)."""
    hkv, n, d = keys.shape
    q = q_last.float().view(hkv, -1, d)
    scores = head_products(q, keys.float().transpose(1, 2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.softmax(scores, dim=-1).view(-1, n)


class CompressedCache(Cache):
    """A Cache whose every layer is compressed by ``method``; reports the bytes it holds."""

    def __init__(self, model, method: Method) -> None:
        if model.config._attn_implementation != "kvlens":
            raise KvlensError(
                "compressed caches need a model loaded by kvlens (attention 'kvlens')"
            )
        facts = model_facts(model)
        self.method = method
        method.setup(model)
        super().__init__(
            layers=[CompressedLayer(method, i, facts.n_layers) for i in range(facts.n_layers)]
        )
        self.prepared = False  # whether the method's own pass after the prefill has run

    def prepare(self, model, context_ids: list[int], tokenizer=None) -> torch.Tensor | None:
        """After the first prefill, once: the method's own pass over the model (KVzip's
        replay of the context), for methods that declare ``prepares``; a no-op otherwise.
        Returns the next-token logits of a prefill the method ran again (GemFilter), else
        None."""
        if self.prepared or not self.method.prepares or not self.layers[0].prefilled:
            return None
        self.prepared = True
        logits = self.method.prepare(model, self, list(context_ids), tokenizer)
        for layer in self.layers:  # the X-ray log's prefill entry: what the pass kept
            if layer.record_history and layer.history:
                seen, tq, attended, _ = layer.history[-1]
                kept = [p.to(torch.int64).cpu() for p in layer.store.positions]
                layer.history[-1] = (seen, tq, attended, kept)
        return logits

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def memory(self) -> dict[str, int | float | None]:
        """Where the held bytes are and what a decoding step reads (``methods.memory``):
        ``device`` + ``host`` = ``nbytes()`` (host: offloaded tensors, e.g. ShadowKV's
        values); for selecting methods, per step summed over layers and averaged over the
        steps so far, the bytes the selection read, the rows read from the device store and
        from the host, and their total (None before any selecting step)."""
        host = sum(
            layer.store.host_nbytes()
            for layer in self.layers
            if layer.store is not None and hasattr(layer.store, "host_nbytes")
        )
        out: dict[str, int | float | None] = {"device": self.nbytes() - host, "host": host}
        steps = max((len(layer.reads) for layer in self.layers), default=0)
        parts = ("read_select", "read_device", "read_host")
        for i, name in enumerate(parts):
            total = sum(r[i] for layer in self.layers for r in layer.reads)
            out[name] = total / steps if steps else None
        out["read_per_step"] = sum(out[p] for p in parts) if steps else None
        return out

    def prefill_compressions(self) -> int:
        """How many times any layer compressed a prefill (one per layer per compression)."""
        return sum(layer.prefill_compressions for layer in self.layers)

    def record_xray(self, on: bool = True) -> None:
        """Log, per layer and call, which positions were attended over and which were kept."""
        for layer in self.layers:
            layer.record_history = on

    def kept_positions(self, layer: int) -> list[torch.Tensor]:
        """Per KV head, the positions the layer holds now."""
        store = self.layers[layer].store
        return [] if store is None else [p.to(torch.int64).cpu() for p in store.positions]

    def copy(self) -> CompressedCache:
        """An independent copy (compress once, ask many)."""
        return copy.deepcopy(self)


def full_cache_nbytes(model, n_tokens: int) -> int:
    """Bytes a full (uncompressed) 16-bit KV cache holds for ``n_tokens`` tokens, by the same
    rule as every compressed store (``methods.memory``), whatever dtype the model computes in."""
    facts = model_facts(model)
    element = element_bytes(model.dtype)
    return 2 * facts.n_layers * facts.n_kv_heads * n_tokens * facts.head_dim * element
