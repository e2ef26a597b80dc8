"""Low-rank keys and values per layer and KV head, from the prompt's own SVD (Palu-style;
Chang et al. 2025, "Palu: KV-Cache Compression with Low-Rank Projection").

After prefill, each head's keys K [L, D] are factored with their SVD; the cache keeps the
coefficients K V_r [L, r] and the basis V_r [D, r] (both float16), and rebuilds K V_r V_r^T.
Values likewise. Palu learns the projection offline and fuses it into the weights; kvlens
computes it from the prompt, so nothing is trained. Later tokens stay in full precision.
A rank equal to head_dim reconstructs exactly (up to float16 rounding of the factors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import PromptEncoder
from methods.memory import held_bytes
from methods.registry import register


@dataclass
class LowRank:
    key_coef: torch.Tensor
    key_basis: torch.Tensor
    value_coef: torch.Tensor
    value_basis: torch.Tensor
    pos: torch.Tensor

    def keys(self):
        return self.key_coef.float() @ self.key_basis.float().T

    def values(self):
        return self.value_coef.float() @ self.value_basis.float().T

    def positions(self):
        return self.pos

    def nbytes(self):
        return held_bytes(
            self.key_coef, self.key_basis, self.value_coef, self.value_basis, self.pos
        )


def factor(x: torch.Tensor, rank: int, dtype=torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficients [L, r], orthonormal basis [D, r]) of the best rank-r approximation."""
    _u, _s, vh = torch.linalg.svd(x.float(), full_matrices=False)
    basis = vh[:rank].T
    return (x.float() @ basis).to(dtype), basis.to(dtype)


@register
@dataclass
class SVDLowRank(PromptEncoder):
    rank: int = 16
    value_rank: int = -1  # -1: the same as rank

    name: ClassVar[str] = "svd"
    family: ClassVar[str] = "low rank"
    paper: ClassVar[str] = "Chang et al. 2025, Palu: KV-Cache Compression with Low-Rank Projection"
    summary: ClassVar[str] = "per-head SVD of the prompt's keys and values, rank r"

    def validate(self) -> None:
        require(self.rank >= 1, self.name, f"rank must be >= 1, got {self.rank}")
        require(
            self.value_rank == -1 or self.value_rank >= 1,
            self.name,
            f"value_rank must be >= 1 or -1, got {self.value_rank}",
        )

    def encode_head(self, obs, head, keys, values, positions):
        v_rank = self.rank if self.value_rank == -1 else self.value_rank
        d = keys.shape[-1]
        kc, kb = factor(keys, min(self.rank, d))
        vc, vb = factor(values, min(v_rank, d))
        return LowRank(kc, kb, vc, vb, positions.clone())
