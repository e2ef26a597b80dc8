"""Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference").

The cache is cut into pages of ``page`` tokens; per page and KV head the store keeps the
channel-wise minimum and maximum of its keys (updated as tokens arrive). A decoding query
bounds each page's best score by sum_i max(q_i * min_i, q_i * max_i)
(``kvlens_kernels.page_bounds``: Triton on CUDA) and reads the top ``budget // page`` pages
(on CUDA chosen by ``kvlens_kernels.page_select`` in one launch, no sort),
the current (last, partial) page always among them, as in the paper's implementation. The first
``dense_layers`` layers read every page (the paper leaves the first two layers dense). Quest is
defined for multi-head attention; with grouped queries a KV group reads one set of pages,
ranked by the group's pooled bound (``pool``: max, which still bounds every head of the group,
or mean). Choosing reads every page's minimum and maximum: 2 / page of the keys' bytes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvlens_kernels.page_bounds import page_bounds
from methods.base import Selection, require
from methods.memory import held_bytes
from methods.registry import register
from methods.sparse.base import POOLS, SparseMethod, top_pages


def page_summaries(keys: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise (min, max) of each page of ``keys`` [H, L, D]: [H, ceil(L / page), D]."""
    h, n, d = keys.shape
    n_pages = -(-n // page)
    pad = n_pages * page - n
    lo = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("inf"))
    hi = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("-inf"))
    return (
        lo.reshape(h, n_pages, page, d).amin(2),
        hi.reshape(h, n_pages, page, d).amax(2),
    )


@register
@dataclass
class Quest(SparseMethod):
    page: int = 16
    pool: str = "max"
    dense_layers: int = 2

    name: ClassVar[str] = "quest"
    paper: ClassVar[str] = (
        "Tang et al. 2024, Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference"
    )
    summary: ClassVar[str] = "pages ranked by a min/max bound of their best query-key score"

    def validate(self) -> None:
        super().validate()
        require(self.page >= 1, self.name, f"page must be >= 1 token, got {self.page}")
        require(self.pool in POOLS, self.name, f"pool must be max or mean, not '{self.pool}'")

    def extend(self, store, obs):
        """Recompute the summaries from the first page that gained tokens."""
        first = store.summarised // self.page
        lo, hi = page_summaries(store.dense_keys()[:, first * self.page :], self.page)
        if first == 0:
            store.meta["kmin"], store.meta["kmax"] = lo, hi
        else:
            store.meta["kmin"] = torch.cat([store.meta["kmin"][:, :first], lo], 1)
            store.meta["kmax"] = torch.cat([store.meta["kmax"][:, :first], hi], 1)
        store.summarised = store.n_tokens

    def choose(self, store, step):
        if store.summarised < store.n_tokens:  # this step's token, appended before attention
            self.extend(store, None)
        kmin, kmax = store.meta["kmin"], store.meta["kmax"]
        bounds = page_bounds(step.query[None], kmin[None], kmax[None], pool=self.pool)[0]
        k = max(1, self.budget // self.page)
        pages = top_pages(bounds, k, last=True)  # the current page always read
        return Selection(pages, page_size=self.page, select_bytes=held_bytes(kmin, kmax))
