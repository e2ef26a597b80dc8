"""COMET-style KV4 with fine-grained mixed precision ("COMET: Towards Practical W4A4KV4 LLMs
Serving", Liu et al. 2024).

COMET's FMPQ quantises most of a tensor to 4 bits in fine-grained groups and keeps the few
groups that hold outliers at 8 bits. kvlens applies that rule to the KV cache: per KV head,
each token's key (and value) vector is cut into groups of ``group`` consecutive channels, each
group quantised asymmetrically with its own fp16 scale and zero point (methods.quant). The
``outlier_groups`` share of groups with the widest range (max - min, what sets a group's
4-bit step; outlier channels put their groups here) is stored at ``outlier_bits``, the rest
at ``bits``; the high groups' indices are kept as int32.

Departures: COMET applies FMPQ to activations and keeps its KV cache at plain 4 bits, picks
the 8-bit groups with an offline channel permutation and runs INT4/INT8 tensor-core kernels;
here the groups are chosen from the prompt per layer and KV head, with no permutation. Later
tokens stay in full precision.

The codes are packed as the other quantisation methods pack them, but two tiers of groups in
one head are not the KIVI layout the quantised-decode kernel reads, so this method runs
through the exact reference path: its Encoding rebuilds dequantised K/V for attention and
counts the packed codes, fp16 scales/zero points and int32 group indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import CodedKV, PromptEncoder
from methods.memory import held_bytes
from methods.quant import Quantized, dequantize, quantize
from methods.registry import register


def group_widths(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [L, D] -> the range (max - min) of each group of ``group`` channels, [L * D / group]."""
    g = x.float().reshape(-1, group)
    return g.amax(1) - g.amin(1)


@dataclass
class MixedGroups:
    """One tensor [L, D] as groups of channels, the widest at the high width."""

    high_index: torch.Tensor  # int32: flat group numbers (token * D / group + block)
    high: Quantized | None
    low: Quantized | None
    shape: tuple[int, int]
    group: int

    @classmethod
    def encode(cls, x: torch.Tensor, bits: int, high_bits: int, share: float, group: int):
        grid = x.float().reshape(-1, group)
        n_high = round(share * grid.shape[0])
        index = torch.sort(torch.topk(group_widths(x, group), n_high).indices).values
        is_high = torch.zeros(grid.shape[0], dtype=torch.bool, device=x.device)
        is_high[index] = True
        high = quantize(grid[is_high], high_bits, -1) if n_high else None
        low = quantize(grid[~is_high], bits, -1) if n_high < grid.shape[0] else None
        return cls(index.to(torch.int32), high, low, tuple(x.shape), group)

    def rebuild(self) -> torch.Tensor:
        n, d = self.shape
        index = self.high_index.long()
        is_high = torch.zeros(n * d // self.group, dtype=torch.bool, device=index.device)
        is_high[index] = True
        order = torch.cat([index, torch.nonzero(~is_high).flatten()])  # high groups first
        parts = [dequantize(q) for q in (self.high, self.low) if q is not None]
        # gather back to group order (index_select, much faster than an index_put)
        return torch.cat(parts).index_select(0, torch.argsort(order)).reshape(n, d)

    def nbytes(self) -> int:
        return held_bytes(self.high_index) + sum(
            q.nbytes() for q in (self.high, self.low) if q is not None
        )


@register
@dataclass
class Comet(PromptEncoder):
    bits: int = 4
    outlier_bits: int = 8
    outlier_groups: float = 0.05
    group: int = 16

    name: ClassVar[str] = "comet"
    family: ClassVar[str] = "quantisation"
    paper: ClassVar[str] = "Liu et al. 2024, COMET: Towards Partical [sic] W4A4KV4 LLMs Serving"
    summary: ClassVar[str] = "KV4 in channel groups, the widest-range groups at 8 bits"

    def validate(self) -> None:
        for name in ("bits", "outlier_bits"):
            bits = getattr(self, name)
            require(bits in (2, 4, 8), self.name, f"{name} must be 2, 4 or 8, got {bits}")
        require(
            self.outlier_bits >= self.bits,
            self.name,
            f"outlier_bits={self.outlier_bits} must be >= bits={self.bits}",
        )
        require(
            0.0 <= self.outlier_groups <= 1.0,
            self.name,
            f"outlier_groups must be in [0, 1], got {self.outlier_groups}",
        )
        require(self.group >= 1, self.name, f"group must be >= 1, got {self.group}")

    def encode_head(self, obs, head, keys, values, positions):
        # checked here, not in new_store: compose probes new_store with a dummy head size
        require(
            keys.shape[-1] % self.group == 0,
            self.name,
            f"group={self.group} must divide the head dimension {keys.shape[-1]}",
        )
        args = (self.bits, self.outlier_bits, self.outlier_groups, self.group)
        return CodedKV(
            MixedGroups.encode(keys, *args), MixedGroups.encode(values, *args), positions.clone()
        )
