"""Per-token int8 baseline: every token's key and value quantised to 8 bits with its own scale
and zero point (over its channels), no full-precision window. The simplest quantised cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.base import Method
from methods.quantization.store import QuantHeadStore
from methods.registry import register


@register
@dataclass
class Int8(Method):
    name: ClassVar[str] = "int8"
    family: ClassVar[str] = "quantisation"
    paper: ClassVar[str] = "baseline (per-token 8-bit round-to-nearest)"
    summary: ClassVar[str] = "every token's keys and values in 8 bits, per-token scales"
    decode_needs_attention: ClassVar[bool] = False

    def new_store(self, n_kv_heads, head_dim, dtype, device):
        return QuantHeadStore(
            n_kv_heads,
            head_dim,
            dtype,
            device,
            key_bits=8,
            value_bits=8,
            group=1,
            residual=0,
            key_grouping="token",
        )

    def compress(self, store, obs) -> None:
        store.flush()
