"""KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache").

Keys have a few outlier channels (see analysis.outliers), so keys are quantised per channel
over groups of ``group`` tokens; values per token. The newest tokens stay in full precision
in a residual window of up to ``residual`` tokens and are quantised a group at a time as it
overflows. Prefill attention is exact; the cache is quantised after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.base import Method, require
from methods.quantization.store import QuantHeadStore
from methods.registry import register


@register
@dataclass
class KIVI(Method):
    bits: int = 2
    group: int = 32
    residual: int = 128

    name: ClassVar[str] = "kivi"
    family: ClassVar[str] = "quantisation"
    paper: ClassVar[str] = (
        "Liu et al. 2024, KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"
    )
    summary: ClassVar[str] = "keys per channel, values per token, full-precision recent window"
    decode_needs_attention: ClassVar[bool] = False

    def validate(self) -> None:
        require(self.bits in (2, 4, 8), self.name, f"bits must be 2, 4 or 8, got {self.bits}")
        require(self.group >= 1, self.name, f"group must be >= 1, got {self.group}")
        require(self.residual >= 0, self.name, f"residual must be >= 0, got {self.residual}")

    def rotation(self, head_dim: int, device):
        return None

    def new_store(self, n_kv_heads, head_dim, dtype, device):
        return QuantHeadStore(
            n_kv_heads,
            head_dim,
            dtype,
            device,
            key_bits=self.bits,
            value_bits=self.bits,
            group=self.group,
            residual=self.residual,
            key_grouping="channel",
            rotation=self.rotation(head_dim, device),
        )

    def compress(self, store, obs) -> None:
        store.flush()
