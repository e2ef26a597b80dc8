"""What every sparse-attention / KV-retrieval method shares.

The whole cache is kept (``SparseStore``); on each decoding step the method chooses, per KV
head, the rows that step's attention reads (``select``), and the step's attention is exact
over just those rows. ``budget`` is the number of tokens a KV head reads per step (rounded to
whole pages or clusters as each method reads them). Prefill and any later multi-token call
(a question appended to a context) attend in full: the selection is a decoding-time method.
The query heads of a KV group share the rows they read (the store is per KV head), so each
method pools its group's scores; ``dense_layers`` first layers read everything (Quest leaves
the first two layers dense).

A method summarises the cache in ``build`` (after the prefill) and ``extend`` (after every
later call, with the tokens the store gained), held in ``store.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import kvlens_kernels.page_select as page_select
from methods.base import DecodeStep, Method, Observation, Selection, require
from methods.sparse.store import SparseStore

POOLS = ("max", "mean")


@dataclass
class SparseMethod(Method):
    budget: int = 256
    dense_layers: int = 0

    family: ClassVar[str] = "sparse"
    selects: ClassVar[bool] = True

    def validate(self) -> None:
        require(self.budget >= 1, self.name, f"budget must be >= 1 token, got {self.budget}")
        require(
            self.dense_layers >= 0,
            self.name,
            f"dense_layers must be >= 0, got {self.dense_layers}",
        )

    def new_store(self, n_kv_heads: int, head_dim: int, dtype, device) -> SparseStore:
        return SparseStore(n_kv_heads, head_dim, dtype, device)

    def compress(self, store: SparseStore, obs: Observation) -> None:
        """Nothing is evicted: only the method's summaries follow the store."""
        if obs.prefill:
            self.build(store, obs)
        else:
            self.extend(store, obs)

    def build(self, store: SparseStore, obs: Observation) -> None:
        """Summarise the prefilled store (default: as any later call)."""
        self.extend(store, obs)

    def extend(self, store: SparseStore, obs: Observation) -> None:
        """Bring the summaries up to the tokens appended since (default: nothing)."""

    def select(self, store: SparseStore, step: DecodeStep) -> Selection:
        if step.layer < self.dense_layers:
            return every_row(store)
        return self.choose(store, step)

    def choose(self, store: SparseStore, step: DecodeStep) -> Selection:
        raise NotImplementedError


def every_row(store: SparseStore) -> Selection:
    """Every stored row of every head (a dense step; choosing it read nothing)."""
    rows = torch.arange(store.n_tokens, device=store.dense_keys().device)
    return Selection([rows] * store.n_heads, page_size=1)


def pool_group(x: torch.Tensor, group: int, pool: str) -> torch.Tensor:
    """[Hq, N] per query head -> [Hkv, N] per KV head (max or mean over each group)."""
    grouped = x.reshape(-1, group, x.shape[-1])
    return grouped.amax(1) if pool == "max" else grouped.mean(1)


def top_with(scores: torch.Tensor, k: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending indices of the ``k`` best of ``scores`` [N] (float32), ``forced`` [N] bool
    entries first (always taken, even past k)."""
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    s = scores.float()
    if forced is not None:
        s = s.masked_fill(forced, float("inf"))
        k = max(k, int(forced.sum()))
    return torch.topk(s, k).indices.sort().values


def top_pages(scores: torch.Tensor, k: int, *, last: bool = False) -> list[torch.Tensor]:
    """``top_with`` for every row of ``scores`` [H, N]: per row the ascending (int64) indices
    of its ``k`` best, with ``last`` the final entry (Quest's current page) always among them.
    On CUDA one launch of the Triton selection (``kvlens_kernels.page_select``) replaces a
    ``torch.topk`` and a sort per row: the same set wherever the scores are distinct; among
    equal scores at the k-th place it takes the lowest indices (torch.topk's pick is
    unspecified). Elsewhere the rows go through ``top_with`` as before."""
    if page_select.kernel_applies(scores):
        kk = max(k, 1) if last else k
        with torch.cuda.device(scores.device):
            chosen = page_select.page_select_triton(scores.float()[None], kk, force_last=last)
        return list(chosen[0].long().unbind(0))
    forced = None
    if last:
        forced = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        forced[-1] = True
    return [top_with(scores[h], k, forced) for h in range(scores.shape[0])]
