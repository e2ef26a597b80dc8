"""RotateKV-style rotation (after RotateKV, Su et al. 2025, and QuaRot, Ashkboos et al. 2024):
a normalised Hadamard rotation of keys and values before KIVI-style quantisation spreads
outlier channels over all channels, so a per-token grouping of keys loses less
(analysis.outliers measures exactly this). kvlens rotates after RoPE with a fixed Sylvester
Hadamard matrix; RotateKV additionally reorders channels and rotates pre-RoPE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from analysis.outliers import hadamard
from methods.quantization.kivi import KIVI
from methods.quantization.store import QuantHeadStore
from methods.registry import register


@register
@dataclass
class RotateKV(KIVI):
    key_grouping: str = "token"

    name: ClassVar[str] = "rotatekv"
    paper: ClassVar[str] = "Su et al. 2025, RotateKV (rotation before quantisation; after QuaRot)"
    summary: ClassVar[str] = "Hadamard-rotated keys/values, then low-bit quantisation"

    def validate(self) -> None:
        super().validate()
        from methods.base import require

        require(
            self.key_grouping in ("token", "channel"),
            self.name,
            f"key_grouping must be token or channel, not '{self.key_grouping}'",
        )

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
            key_grouping=self.key_grouping,
            rotation=hadamard(head_dim, device),
        )
