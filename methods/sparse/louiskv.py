"""LouisKV (2025, "LouisKV: Efficient KV Cache Retrieval for Long Input-Output Sequences").

Retrieval only at semantic boundaries, over units that differ for the input and the output:

- Units. The prompt's keys are clustered once after the prefill (per KV head, k-means of the
  unit-normalised keys into ``clusters`` semantic clusters; a cluster's summary is the mean of
  its keys). Tokens after the prompt are cut, as they arrive, into consecutive segments of
  ``segment`` tokens, each summarised by its mean key (generated text is local in time).
- Trigger. A step retrieves when its query has moved away from the query of the last retrieval:
  the mean cosine similarity over the layer's query heads falls below ``threshold`` (a semantic
  boundary); otherwise the rows of the last retrieval are read again (temporal locality), so a
  step between boundaries chooses nothing.
- Retrieval. Each unit's tokens are estimated to get exp(s_u) / sum_v N_v exp(s_v) of the
  attention (s: the query's scaled score of the unit's summary, N: unit sizes), pooled over
  the KV group (``pool``); whole units are read, best first, until the ``budget`` (less the
  always-read rows) is covered, the last unit may overshoot.
- Always read: the ``local`` newest tokens and the tokens after the prompt not yet in a whole
  segment.

Departures, stated: the paper's thresholds, unit sizes and its offloaded layout (the full cache
in host memory, retrieved units moved to the device) are not modelled: the cache is held on the
device as across kvlens's sparse family, and bytes held are the cache plus the unit summaries
and the prompt's cluster index. Its Triton/CUDA kernels for clustering and retrieval are not
reproduced (k-means here is ``methods.sparse.squeezed.kmeans``).

Choosing reads, at a retrieval, every unit summary and the chosen units' row indices; between
boundaries nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Selection, require
from methods.memory import element_bytes, held_bytes
from methods.registry import register
from methods.sparse.base import POOLS, SparseMethod, every_row, pool_group
from methods.sparse.squeezed import kmeans


@register
@dataclass
class LouisKV(SparseMethod):
    clusters: int = 64
    segment: int = 16
    threshold: float = 0.8
    local: int = 16
    iters: int = 10
    pool: str = "mean"
    seed: int = 0

    name: ClassVar[str] = "louiskv"
    paper: ClassVar[str] = (
        "LouisKV: Efficient KV Cache Retrieval for Long Input-Output Sequences (2025)"
    )
    summary: ClassVar[str] = (
        "retrieval at semantic boundaries: prompt clusters and output segments, reused between"
    )

    def validate(self) -> None:
        super().validate()
        for name in ("clusters", "segment"):
            value = getattr(self, name)
            require(value >= 1, self.name, f"{name} must be >= 1, got {value}")
        require(self.local >= 0, self.name, f"local must be >= 0 tokens, got {self.local}")
        require(self.iters >= 0, self.name, f"iters must be >= 0, got {self.iters}")
        require(
            -1.0 <= self.threshold <= 1.0,
            self.name,
            f"threshold must be a cosine similarity in [-1, 1], got {self.threshold}",
        )
        require(self.pool in POOLS, self.name, f"pool must be max or mean, not '{self.pool}'")

    def build(self, store, obs) -> None:
        keys = store.dense_keys()  # [Hkv, L, D]: the prompt
        n = keys.shape[1]
        k = min(self.clusters, n)
        cents, orders, offsets = [], [], []
        for h in range(store.n_heads):
            x = keys[h].float()
            basis = torch.nn.functional.normalize(x, dim=-1)
            labels = kmeans(basis, k, self.iters, self.seed + 7919 * obs.layer + h)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, x)
            cents.append(sums / counts.clamp(min=1)[:, None])
            orders.append(torch.argsort(labels, stable=True).to(torch.int32))
            offsets.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32))
        store.meta["centroids"] = torch.stack(cents).to(keys.dtype)  # [Hkv, C, D]
        store.meta["order"] = torch.stack(orders)  # [Hkv, L]
        store.meta["offsets"] = torch.stack(offsets)  # [Hkv, C + 1]
        store.meta["segments"] = keys.new_zeros(store.n_heads, 0, keys.shape[2])
        store.summarised = n

    def _segments(self, store) -> torch.Tensor:
        """Mean keys [Hkv, S, D] of the whole segments after the prompt (brought up to date)."""
        keys, segs = store.dense_keys(), store.meta["segments"]
        start = store.summarised + segs.shape[1] * self.segment
        whole = (store.n_tokens - start) // self.segment
        if whole:
            new = keys[:, start : start + whole * self.segment].float()
            new = new.reshape(store.n_heads, whole, self.segment, -1).mean(2)
            segs = torch.cat([segs, new.to(segs.dtype)], 1)
            store.meta["segments"] = segs
        return segs

    def _retrieve(self, store, step, budget: int) -> tuple[list[torch.Tensor], int]:
        """Per KV head the rows of the best whole units covering ``budget`` tokens, and the
        bytes of row indices read."""
        cents, order = store.meta["centroids"].float(), store.meta["order"]
        offsets = store.meta["offsets"].long()
        segs = self._segments(store).float()
        n_prompt, n_segs = store.summarised, segs.shape[1]
        c_sizes = (offsets[:, 1:] - offsets[:, :-1]).float()  # [Hkv, C]
        sizes = torch.cat([c_sizes, c_sizes.new_full((store.n_heads, n_segs), self.segment)], 1)
        summaries = torch.cat([cents, segs], 1)  # [Hkv, U, D]
        q = step.query.float().reshape(store.n_heads, step.group, -1)
        logits = q @ summaries.transpose(1, 2) * step.scale  # [Hkv, G, U]
        norm = torch.logsumexp(logits + sizes.clamp(min=1).log()[:, None], -1, keepdim=True)
        est = pool_group(
            torch.exp(logits - norm).reshape(-1, sizes.shape[1]), step.group, self.pool
        )
        est = est.masked_fill(sizes == 0, float("-inf"))
        rows, index_reads = [], 0
        for h in range(store.n_heads):
            ranked = torch.argsort(est[h], descending=True, stable=True)
            before = torch.cumsum(sizes[h][ranked], 0) - sizes[h][ranked]
            chosen = ranked[(before < budget) & (sizes[h][ranked] > 0)]
            parts = []
            for u in chosen.tolist():
                if u < cents.shape[1]:
                    part = order[h, int(offsets[h, u]) : int(offsets[h, u + 1])].long()
                    index_reads += part.numel()
                    parts.append(part)
                else:
                    first = n_prompt + (u - cents.shape[1]) * self.segment
                    parts.append(torch.arange(first, first + self.segment, device=order.device))
            rows.append(torch.cat(parts) if parts else order.new_zeros(0).long())
        return rows, index_reads * element_bytes(order.dtype)

    def choose(self, store, step) -> Selection:
        if "centroids" not in store.meta:  # no prefill to cluster (a one-token prompt)
            return every_row(store)
        n = store.n_tokens
        device = store.dense_keys().device
        segs = self._segments(store)
        tail = store.summarised + segs.shape[1] * self.segment  # first row not in a segment
        always = torch.arange(min(tail, max(0, n - self.local)), n, device=device)
        if self.budget >= n:
            return every_row(store)
        anchor = store.meta.get("anchor")
        q = step.query.float()
        similar = (
            anchor is not None
            and float(torch.nn.functional.cosine_similarity(q, anchor.float(), dim=-1).mean())
            >= self.threshold
        )
        select = 0
        if not similar:  # a semantic boundary: retrieve afresh
            found, select = self._retrieve(store, step, max(0, self.budget - always.numel()))
            store.retrieved = found
            store.meta["anchor"] = step.query.clone()
            store.retrievals = getattr(store, "retrievals", 0) + 1
            select += held_bytes(store.meta["centroids"], store.meta["offsets"], segs)
        pages = [torch.unique(torch.cat([r, always])) for r in store.retrieved]
        return Selection(pages, page_size=1, select_bytes=select)
