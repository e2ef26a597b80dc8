"""KeyDiff (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for
Long-Context LLM Inference in Resource-Constrained Environments").

Keys whose direction stands apart from the rest tend to draw high attention, so each KV head
keeps its ``budget`` most *distinctive* keys: a key's score is minus its cosine similarity
to an anchor, the mean direction of the head's keys. Nothing here reads a query or an
attention map, so the score suits a context compressed before its question is known.

Choices, each documented:
- The anchor is the mean of the *unit-normalised* keys, so every token's direction counts
  once and a few large-norm keys do not set it (the paper's anchor is a mean of key
  directions; kvpress's KeyDiffPress uses the same).
- The paper evicts block by block while a long prompt streams in; kvlens compresses once,
  after the prefill, over the whole prompt (kvpress's choice), and keeps every later token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.eviction.base import EvictionMethod
from methods.registry import register


def key_diversity(keys: torch.Tensor) -> torch.Tensor:
    """[L, D] keys -> [L] minus the cosine similarity of each to the mean key direction."""
    unit = F.normalize(keys.float(), dim=-1)
    anchor = F.normalize(unit.mean(0), dim=-1)
    return -(unit @ anchor)


@register
@dataclass
class KeyDiff(EvictionMethod):
    name: ClassVar[str] = "keydiff"
    paper: ClassVar[str] = "Park et al. 2025, KeyDiff: Key Similarity-Based KV Cache Eviction"
    summary: ClassVar[str] = (
        "keep the keys least similar (cosine) to the mean key direction, at prefill "
        "(query-agnostic)"
    )
    decode_needs_attention: ClassVar[bool] = False

    def scores(self, store, obs, head) -> torch.Tensor:
        return key_diversity(obs.keys[head])
