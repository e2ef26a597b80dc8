"""KV cache clustering (Chelsea: "Efficient Long-Context LLM Inference via KV Cache Clustering").

Keys lie close to their neighbours along the sequence, so similar tokens are merged into one
centroid each instead of being evicted. Chunked soft matching: the mergeable tokens of a KV
head are cut into chunks of ``chunk`` consecutive tokens; inside a chunk they alternate
between two sets (even -> A, odd -> B), every A token finds its most similar B token (cosine
of keys), and the most similar pairs across the head are merged, A into B. Rounds repeat until
the head holds ``budget`` tokens. A centroid's key and value are the size-weighted means of
its members, and its size ``n`` is stored with it: attention adds ``log n`` to the centroid's
logit (proportional attention), so a centroid of n identical keys draws exactly the weight,
and gives exactly the output, of those n tokens. The first ``sinks`` and the last ``recent``
tokens are never merged. Compression runs once, after the prefill; later tokens are kept.

Choices, each a parameter: ``proportional=false`` drops the ``log n`` term (plain averaged
centroids, as merging methods without sizes do). Decoding reads the store on the exact
(statistics) path, which applies the sizes; the sparse decode kernel takes no logit bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import Method, Observation, require
from methods.cache import HeadStore
from methods.registry import register

SIZE = "cluster_size"  # per-token state: members of the centroid (0 = a single, unmerged token)


class ClusterStore(HeadStore):
    """Per-head tokens plus each one's cluster size; attention adds log(size) to its logit."""

    supports_decode = False  # the sparse decode kernel has no logit bias: exact path instead

    def __init__(self, *args, proportional: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.proportional = proportional

    def logit_bias(self) -> list[torch.Tensor] | None:
        if not self.proportional or SIZE not in self._aux:
            return None
        return [s.clamp_min(1.0).log() for s in self.aux[SIZE]]


def soft_matching_round(
    keys: torch.Tensor, mergeable: torch.Tensor, chunk: int, n_merge: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of chunked soft matching over the ``mergeable`` rows (bool [L]) of ``keys``.

    Returns (sources, targets): the ``<= n_merge`` A rows merged this round and the B row each
    goes into, the pairs of highest key cosine among each A token's best B in its chunk.
    """
    idx = mergeable.nonzero().squeeze(1)
    unit = F.normalize(keys[idx].float(), dim=-1)
    src, dst, sim = [], [], []
    for c0 in range(0, idx.numel(), chunk):
        part = unit[c0 : c0 + chunk]
        a, b = part[0::2], part[1::2]
        if a.shape[0] == 0 or b.shape[0] == 0:
            continue
        best, where = (a @ b.T).max(dim=1)
        src.append(idx[c0 : c0 + chunk][0::2])
        dst.append(idx[c0 : c0 + chunk][1::2][where])
        sim.append(best)
    if not src:
        return idx[:0], idx[:0]
    src, dst, sim = torch.cat(src), torch.cat(dst), torch.cat(sim)
    top = torch.topk(sim, min(n_merge, sim.numel())).indices
    return src[top], dst[top]


@register
@dataclass
class KVCluster(Method):
    budget: int = 128
    chunk: int = 64
    sinks: int = 4
    recent: int = 32
    proportional: bool = True

    name: ClassVar[str] = "kvcluster"
    family: ClassVar[str] = "merging"
    paper: ClassVar[str] = (
        "Chelsea 2025, Efficient Long-Context LLM Inference via KV Cache Clustering"
    )
    summary: ClassVar[str] = (
        "chunked soft matching merges similar keys into centroids; attention weighted by "
        "cluster size (log n in the logits)"
    )
    decode_needs_attention: ClassVar[bool] = False

    def validate(self) -> None:
        require(self.budget >= 1, self.name, f"budget must be >= 1 token, got {self.budget}")
        require(self.chunk >= 2, self.name, f"chunk must be >= 2 tokens, got {self.chunk}")
        require(self.sinks >= 0, self.name, f"sinks must be >= 0, got {self.sinks}")
        require(self.recent >= 0, self.name, f"recent must be >= 0, got {self.recent}")
        require(
            self.sinks + self.recent < self.budget,
            self.name,
            f"sinks + recent ({self.sinks + self.recent}) must be < budget ({self.budget})",
        )

    def new_store(self, n_kv_heads, head_dim, dtype, device):
        return ClusterStore(n_kv_heads, head_dim, dtype, device, proportional=self.proportional)

    def compress(self, store, obs: Observation) -> None:
        if not obs.prefill:
            return
        over = [h for h in range(store.n_heads) if obs.positions[h].numel() > self.budget]
        if over:
            store.aux_state(SIZE)  # sizes start at 0: every token its own cluster
        for h in over:
            self._cluster(store, h, obs.n_seen)

    def _cluster(self, store, h: int, n_seen: int) -> None:
        keys = store.keys[h].float().clone()
        values = store.values[h].float().clone()
        pos = store.positions[h].to(torch.int64)
        size = store.aux[SIZE][h].clamp_min(1.0)
        alive = torch.ones(pos.numel(), dtype=torch.bool, device=keys.device)
        protected = (pos < self.sinks) | (pos >= n_seen - self.recent)
        while int(alive.sum()) > self.budget:
            need = int(alive.sum()) - self.budget
            src, dst = soft_matching_round(keys, alive & ~protected, self.chunk, need)
            if src.numel() == 0:
                break
            rows = dst.unique()
            total = size.clone().index_add_(0, dst, size[src])
            for x in (keys, values):
                acc = torch.zeros_like(x).index_add_(0, dst, x[src] * size[src][:, None])
                x[rows] = (x[rows] * size[rows][:, None] + acc[rows]) / total[rows][:, None]
            size = total
            alive[src] = False
        store.keys[h][:] = keys.to(store.keys[h].dtype)
        store.values[h][:] = values.to(store.values[h].dtype)
        store.aux[SIZE][h][:] = size
        store.keep(h, alive.nonzero().squeeze(1))
