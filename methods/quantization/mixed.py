"""ZipCache / MiKV-style mixed precision (He et al. 2024, "ZipCache"; Yang et al. 2024, "No
Token Left Behind: MiKV").

Salient tokens get more bits: after prefill each KV head ranks the prompt's tokens by their
normalised accumulated attention (mass received divided by the queries that could see them,
ZipCache's saliency), stores the top ``salient`` fraction at ``high_bits`` and the rest at
``low_bits``, both per token. ZipCache quantises low-bit keys channel-separably; kvlens uses
per-token groups for both tiers. Later tokens stay in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import PromptEncoder
from methods.eviction.base import group_mean
from methods.memory import held_bytes
from methods.quant import Quantized, dequantize, quantize
from methods.registry import register


@dataclass
class Tiers:
    parts: list[tuple[Quantized, Quantized, torch.Tensor]]  # (keys, values, positions) per tier

    def keys(self):
        return torch.cat([dequantize(k) for k, _v, _p in self.parts])

    def values(self):
        return torch.cat([dequantize(v) for _k, v, _p in self.parts])

    def positions(self):
        return torch.cat([p for _k, _v, p in self.parts])

    def nbytes(self):
        return sum(k.nbytes() + v.nbytes() + held_bytes(p) for k, v, p in self.parts)


@register
@dataclass
class MixedPrecision(PromptEncoder):
    salient: float = 0.2
    high_bits: int = 8
    low_bits: int = 2

    name: ClassVar[str] = "zipcache"
    family: ClassVar[str] = "quantisation"
    paper: ClassVar[str] = "He et al. 2024, ZipCache; Yang et al. 2024, MiKV"
    summary: ClassVar[str] = "salient tokens (by normalised attention) at more bits than the rest"

    def validate(self) -> None:
        require(
            0.0 <= self.salient <= 1.0, self.name, f"salient must be in [0, 1], got {self.salient}"
        )
        for name in ("high_bits", "low_bits"):
            bits = getattr(self, name)
            require(bits in (2, 4, 8), self.name, f"{name} must be 2, 4 or 8, got {bits}")

    def encode_head(self, obs, head, keys, values, positions):
        pos = positions.long()
        seen = (obs.n_seen - pos).clamp_min(1).float()
        saliency = group_mean(obs.received[head]) / seen
        n_hi = round(self.salient * pos.numel())
        order = torch.argsort(saliency, descending=True)
        tiers = []
        for idx, bits in ((order[:n_hi], self.high_bits), (order[n_hi:], self.low_bits)):
            if idx.numel():
                idx = idx.sort().values
                tiers.append(
                    (
                        quantize(keys[idx], bits, -1),
                        quantize(values[idx], bits, -1),
                        positions[idx].clone(),
                    )
                )
        return Tiers(tiers)
