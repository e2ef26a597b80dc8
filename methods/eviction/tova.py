"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs").

Token Omission Via Attention: when over budget, evict the tokens with the lowest attention
from the current (last) query. At prefill the current query is the prompt's last token;
then it is each generated token.

Two choices are parameters:
- ``average``: the paper averages the last query's attention over all of a layer's heads, so
  every head keeps the same tokens (``layer``, the default); ``group`` averages only the query
  heads of each KV group, letting each KV head keep its own tokens.
- ``schedule``: the paper evicts at every step, holding the cache at its budget
  (``continuous``, the default); kvpress's TOVAPress compresses once at prefill and keeps
  everything after (``prefill``). With a question appended after the context, the two differ
  a lot: the continuous cache keeps evicting while the question is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.base import require
from methods.eviction.base import AVERAGES, ScheduledEviction, head_mean
from methods.registry import register


@register
@dataclass
class TOVA(ScheduledEviction):
    average: str = "layer"

    name: ClassVar[str] = "tova"
    paper: ClassVar[str] = "Oren et al. 2024, Transformers are Multi-State RNNs"
    summary: ClassVar[str] = (
        "lowest attention from the current query is evicted "
        "(average: layer = paper | group; schedule: continuous = paper | prefill = kvpress)"
    )

    def validate(self) -> None:
        super().validate()
        require(
            self.average in AVERAGES,
            self.name,
            f"average must be {' or '.join(AVERAGES)}, not '{self.average}'",
        )

    def scores(self, store, obs, head):
        return head_mean(obs.last, head, self.average)
