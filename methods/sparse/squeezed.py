"""Squeezed Attention (Hooper et al. 2024, "Squeezed Attention: Accelerating Long Context
Length LLM Inference").

The context (the prompt, fixed across user inputs) is clustered once, offline, after the
prefill: per KV head, k-means of its keys into ``clusters`` groups (on unit-normalised keys
as the paper's code does, ``normalize``; each centroid is the mean of its cluster's keys, so
q . c is the cluster's mean logit). A decoding query scores the centroids: each key of
cluster j is estimated to get exp(q . c_j) / sum_i N_i exp(q . c_i) of the attention (N_i:
cluster sizes), pooled over the KV group's query heads (mean). Whole clusters are read,
best first, until ``budget`` context tokens are covered (the last may overshoot); tokens
after the context (a question, generated tokens) are always read. The paper picks clusters
above a threshold calibrated for a target sparsity; a token budget is that target stated
directly. Lloyd's iterations from a k-means++ start seeded by ``seed``.

Held: the centroids [C, D] at 16 bits, and per KV head the context's rows ordered by
cluster (int32) with the clusters' offsets (int32) -- a server stores the keys in that order
so a cluster is one contiguous read. Choosing reads the centroids and the chosen clusters'
row indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Selection, require
from methods.memory import element_bytes, held_bytes
from methods.registry import register
from methods.sparse.base import SparseMethod, every_row


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Cluster labels [N] (int64) of the rows of ``x`` [N, D] into ``k`` clusters: k-means++
    seeding, then Lloyd's iterations (an emptied cluster keeps its previous centre)."""
    gen = torch.Generator().manual_seed(seed)
    x = x.float()
    n = x.shape[0]
    centres = x[torch.randint(n, (1,), generator=gen)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).amin(1).pow(2)
        if float(d2.sum()) <= 0:
            pick = torch.randint(n, (1,), generator=gen)
        else:
            pick = torch.multinomial((d2 / d2.sum()).cpu(), 1, generator=gen)
        centres = torch.cat([centres, x[pick.to(x.device)]])
    labels = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


@register
@dataclass
class Squeezed(SparseMethod):
    clusters: int = 64
    iters: int = 10
    normalize: bool = True
    seed: int = 0

    name: ClassVar[str] = "squeezed"
    paper: ClassVar[str] = (
        "Hooper et al. 2024, Squeezed Attention: Accelerating Long Context Length LLM Inference"
    )
    summary: ClassVar[str] = "k-means of the context's keys; the query reads the best clusters"

    def validate(self) -> None:
        super().validate()
        require(self.clusters >= 1, self.name, f"clusters must be >= 1, got {self.clusters}")
        require(self.iters >= 0, self.name, f"iters must be >= 0, got {self.iters}")

    def build(self, store, obs):
        keys = store.dense_keys()  # [Hkv, L, D]: the fixed context
        n = keys.shape[1]
        k = min(self.clusters, n)
        centroids, orders, offsets = [], [], []
        for h in range(store.n_heads):
            x = keys[h].float()
            basis = torch.nn.functional.normalize(x, dim=-1) if self.normalize else x
            labels = kmeans(basis, k, self.iters, self.seed + 7919 * obs.layer + h)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, x)
            centroids.append(sums / counts.clamp(min=1)[:, None])
            orders.append(torch.argsort(labels, stable=True).to(torch.int32))
            offsets.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32))
        store.meta["centroids"] = torch.stack(centroids).to(keys.dtype)  # [Hkv, C, D]
        store.meta["order"] = torch.stack(orders)  # [Hkv, L]
        store.meta["offsets"] = torch.stack(offsets)  # [Hkv, C + 1]
        store.summarised = n  # the context; later tokens are read in full

    def choose(self, store, step):
        if "centroids" not in store.meta:  # no prefill to cluster (a one-token prompt)
            return every_row(store)
        cents = store.meta["centroids"].float()
        order, offsets = store.meta["order"], store.meta["offsets"]
        sizes = (offsets[:, 1:] - offsets[:, :-1]).to(torch.float32)  # [Hkv, C]
        q = step.query.float().reshape(store.n_heads, step.group, -1)
        logits = q @ cents.transpose(1, 2) * step.scale  # [Hkv, G, C]
        # per-key estimate exp(s_j) / sum_i N_i exp(s_i), in log space
        norm = torch.logsumexp(logits + sizes.log()[:, None], dim=-1, keepdim=True)
        estimate = torch.exp(logits - norm).mean(1)  # [Hkv, C]
        estimate = estimate.masked_fill(sizes == 0, float("-inf"))
        context, now = store.summarised, store.n_tokens
        rows, index_reads = [], 0
        for h in range(store.n_heads):
            ranked = torch.argsort(estimate[h], descending=True, stable=True)
            before = torch.cumsum(sizes[h][ranked], 0) - sizes[h][ranked]  # tokens before each
            chosen = ranked[before < self.budget]
            chosen = chosen[sizes[h][chosen] > 0]
            parts = [order[h, int(offsets[h, c]) : int(offsets[h, c + 1])] for c in chosen]
            picked = torch.cat(parts).to(torch.int64) if parts else order.new_zeros(0).long()
            index_reads += picked.numel()
            tail = torch.arange(context, now, device=picked.device)
            rows.append(torch.cat([picked.sort().values, tail]))
        select = held_bytes(store.meta["centroids"], offsets)
        select += index_reads * element_bytes(order.dtype)
        return Selection(rows, page_size=1, select_bytes=select)
