"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs").

Token Omission Via Attention: when over budget, evict the tokens with the lowest attention
from the current (last) query, averaged over the group's query heads. At prefill the
current query is the prompt's last token; then it is each generated token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.eviction.base import EvictionMethod, group_mean
from methods.registry import register


@register
@dataclass
class TOVA(EvictionMethod):
    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "Oren et al. 2024, Transformers are Multi-State RNNs"
    summary: ClassVar[str] = "lowest attention from the current query is evicted, every step"
    evict_while_decoding: ClassVar[bool] = True

    def scores(self, store, obs, head):
        return group_mean(obs.last[head])
