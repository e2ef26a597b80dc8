"""Knorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression").

The paper observes that keys with a *low* L2 norm draw high attention (the attention-sink
tokens are the clearest case), so the norm alone, with no query and no attention map, ranks
what to keep: each KV head keeps the ``budget`` keys of lowest norm. The norm is taken on the
stored (post-RoPE) keys; RoPE is a rotation, so pre- and post-RoPE norms are equal.

It compresses once, after the prefill, and keeps every later token (the question, each
generated token), like kvpress's KnormPress; being query-agnostic, it needs no observation
window and lets decoding run through the store's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.eviction.base import EvictionMethod
from methods.registry import register


@register
@dataclass
class Knorm(EvictionMethod):
    name: ClassVar[str] = "knorm"
    paper: ClassVar[str] = (
        "Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
    )
    summary: ClassVar[str] = "keep the keys of lowest L2 norm, at prefill (query-agnostic)"
    decode_needs_attention: ClassVar[bool] = False

    def scores(self, store, obs, head) -> torch.Tensor:
        return -obs.keys[head].float().norm(dim=-1)
