"""StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks").

Keep the first ``sinks`` tokens (attention sinks) and the most recent ``budget - sinks``
tokens, at prefill and at every decoding step. Positions are the original ones (kvlens does
not re-index positions inside the cache as the paper's rolling cache does; with RoPE applied
before caching this is the common practical variant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.base import require
from methods.eviction.base import EvictionMethod, recent_mask
from methods.registry import register


@register
@dataclass
class StreamingLLM(EvictionMethod):
    sinks: int = 4

    name: ClassVar[str] = "streamingllm"
    paper: ClassVar[str] = (
        "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks"
    )
    summary: ClassVar[str] = "first `sinks` tokens + a recent window"
    evict_while_decoding: ClassVar[bool] = True
    decode_needs_attention: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        require(self.sinks >= 0, self.name, f"sinks must be >= 0, got {self.sinks}")
        require(
            self.sinks < self.budget,
            self.name,
            f"sinks ({self.sinks}) must be < budget ({self.budget})",
        )

    def protected(self, obs, head):
        return recent_mask(obs, head, self.budget - self.sinks, self.sinks)

    def scores(self, store, obs, head):
        return obs.positions[head].float()
