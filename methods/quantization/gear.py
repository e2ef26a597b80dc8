"""GEAR (Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM").

Three parts per KV head of the prompt: the largest-magnitude ``outliers`` fraction of entries
kept exactly as a sparse list (int32 index, float16 value); the rest quantised uniformly per
token at ``bits``; and the remaining error approximated at rank ``rank`` (float16 factors from
its SVD). Reconstruction = dequantised + sparse + low rank. Later tokens stay in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import PromptEncoder
from methods.memory import held_bytes
from methods.quant import Quantized, dequantize, quantize
from methods.registry import register


@dataclass
class GearPart:
    dense: Quantized
    sparse_index: torch.Tensor  # int32 flat indices
    sparse_value: torch.Tensor  # float16
    low_a: torch.Tensor  # [L, r] float16
    low_b: torch.Tensor  # [r, D] float16

    def rebuild(self) -> torch.Tensor:
        x = dequantize(self.dense) + self.low_a.float() @ self.low_b.float()
        flat = x.view(-1)
        flat[self.sparse_index.long()] = self.sparse_value.float()
        return x

    def nbytes(self) -> int:
        return self.dense.nbytes() + held_bytes(
            self.sparse_index, self.sparse_value, self.low_a, self.low_b
        )


def gear_encode(x: torch.Tensor, bits: int, rank: int, outliers: float) -> GearPart:
    xf = x.float()
    n_out = int(outliers * xf.numel())
    idx = (
        torch.topk(xf.abs().view(-1), n_out).indices if n_out else torch.empty(0, dtype=torch.long)
    )
    body = xf.clone().view(-1)
    body[idx] = 0.0
    body = body.view_as(xf)
    dense = quantize(body, bits, -1)
    err = body - dequantize(dense)
    u, s, vh = torch.linalg.svd(err, full_matrices=False)
    r = min(rank, s.numel())
    return GearPart(
        dense,
        idx.to(torch.int32),
        xf.view(-1)[idx].half(),
        (u[:, :r] * s[:r]).half(),
        vh[:r].half(),
    )


@dataclass
class Gear:
    k: GearPart
    v: GearPart
    pos: torch.Tensor

    def keys(self):
        return self.k.rebuild()

    def values(self):
        return self.v.rebuild()

    def positions(self):
        return self.pos

    def nbytes(self):
        return self.k.nbytes() + self.v.nbytes() + held_bytes(self.pos)


@register
@dataclass
class GEAR(PromptEncoder):
    bits: int = 4
    rank: int = 4
    outliers: float = 0.02

    name: ClassVar[str] = "gear"
    family: ClassVar[str] = "quantisation"
    paper: ClassVar[str] = "Kang et al. 2024, GEAR: near-lossless KV cache compression"
    summary: ClassVar[str] = "quantised + low-rank error + sparse outliers"

    def validate(self) -> None:
        require(self.bits in (2, 4, 8), self.name, f"bits must be 2, 4 or 8, got {self.bits}")
        require(self.rank >= 0, self.name, f"rank must be >= 0, got {self.rank}")
        require(
            0.0 <= self.outliers < 0.5,
            self.name,
            f"outliers must be in [0, 0.5), got {self.outliers}",
        )

    def encode_head(self, obs, head, keys, values, positions):
        return Gear(
            gear_encode(keys, self.bits, self.rank, self.outliers),
            gear_encode(values, self.bits, self.rank, self.outliers),
            positions.clone(),
        )
