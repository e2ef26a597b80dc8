"""Recent-only baseline: keep the last ``budget`` tokens (a sliding window, no sinks).

The ablation StreamingLLM argues against: without sink tokens, models lose the place where
surplus attention goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.eviction.base import EvictionMethod
from methods.registry import register


@register
@dataclass
class Recent(EvictionMethod):
    name: ClassVar[str] = "recent"
    paper: ClassVar[str] = "baseline (sliding window without sinks)"
    summary: ClassVar[str] = "the last `budget` tokens"
    evict_while_decoding: ClassVar[bool] = True
    decode_needs_attention: ClassVar[bool] = False

    def scores(self, store, obs, head):
        return obs.positions[head].float()
