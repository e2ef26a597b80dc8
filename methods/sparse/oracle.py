"""Oracle top-k: each decoding step reads the ``budget`` keys with the most true attention.

The ceiling of every selection of that size (cf. the oracle top-k of Tang et al. 2024,
"Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", and of Zhang et al.
2023, "H2O"): the step's exact attention over every stored key is computed first, and only
the best ``budget`` rows of each KV head are read for the output. The query heads of a KV
group share their rows: their probabilities are pooled (``pool``: mean, the group's mass,
or max). Choosing reads every key, so the oracle saves no bytes; it measures how much
attention a selection of that size can hold at best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Selection, require
from methods.memory import held_bytes
from methods.registry import register
from methods.sparse.base import POOLS, SparseMethod, pool_group, top_with


@register
@dataclass
class OracleTopK(SparseMethod):
    pool: str = "mean"

    name: ClassVar[str] = "oracle"
    paper: ClassVar[str] = (
        "Tang et al. 2024, Quest: Query-Aware Sparsity for Efficient Long-Context LLM "
        "Inference (oracle top-k baseline)"
    )
    summary: ClassVar[str] = "the true top-k keys of each step per KV head (the ceiling)"

    def validate(self) -> None:
        super().validate()
        require(self.pool in POOLS, self.name, f"pool must be max or mean, not '{self.pool}'")

    def choose(self, store, step):
        keys = store.dense_keys()  # [Hkv, L, D]
        q = step.query.float().reshape(store.n_heads, step.group, -1)
        probs = torch.softmax(q @ keys.float().transpose(1, 2) * step.scale, dim=-1)
        pooled = pool_group(probs.reshape(-1, keys.shape[1]), step.group, self.pool)
        pages = [top_with(pooled[h], self.budget) for h in range(store.n_heads)]
        return Selection(pages, page_size=1, select_bytes=held_bytes(keys))
