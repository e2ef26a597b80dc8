"""Random pages: the baseline a query-aware page selection must beat.

The cache is cut into pages of ``page`` tokens as in Quest (Tang et al. 2024, "Quest:
Query-Aware Sparsity for Efficient Long-Context LLM Inference"); each step reads the current
(last) page and ``budget // page - 1`` other pages drawn uniformly, independently per KV
head, layer and step, from a generator seeded by (seed, layer, step): the same run gives the
same pages. Choosing reads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Selection, require
from methods.registry import register
from methods.sparse.base import SparseMethod


@register
@dataclass
class RandomPages(SparseMethod):
    page: int = 16
    seed: int = 0

    name: ClassVar[str] = "random_pages"
    paper: ClassVar[str] = (
        "Tang et al. 2024, Quest: Query-Aware Sparsity for Efficient Long-Context LLM "
        "Inference (pages; random baseline)"
    )
    summary: ClassVar[str] = "the current page and uniformly random other pages"

    def validate(self) -> None:
        super().validate()
        require(self.page >= 1, self.name, f"page must be >= 1 token, got {self.page}")

    def choose(self, store, step):
        n_pages = -(-store.n_tokens // self.page)
        k = max(1, self.budget // self.page)
        gen = torch.Generator().manual_seed(
            self.seed * 1_000_003 + step.layer * 65_537 + step.n_seen
        )
        pages = []
        for _ in range(store.n_heads):
            others = torch.randperm(n_pages - 1, generator=gen)[: k - 1]
            chosen = torch.cat([others, torch.tensor([n_pages - 1])]).sort().values
            pages.append(chosen.to(store.dense_keys().device))
        return Selection(pages, page_size=self.page)
