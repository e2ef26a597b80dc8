"""xKV-style cross-layer low rank (Chang et al., 2025, "xKV: Cross-Layer SVD for KV-Cache
Compression").

Adjacent layers' keys share their dominant singular vectors (analysis.cross_layer.svd_energy
measures it), so a group of ``group`` layers is factored together: per KV head the layers'
keys are stacked side by side, X = [K_1 | ... | K_g] [L, g*D], and X ~ C B^T with one shared
coefficient matrix C [L, r] and per-layer basis blocks B_i [D, r]. Values likewise. The group
is factored once its last layer has prefilled; C counts once, in the group's first layer.
Later tokens stay in full precision per layer.
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
class SharedLowRank:
    key_coef: torch.Tensor  # [L, r] shared by the group
    key_basis: torch.Tensor  # [D, r] this layer's block
    value_coef: torch.Tensor
    value_basis: torch.Tensor
    pos: torch.Tensor
    owns_coef: bool

    def keys(self):
        return self.key_coef.float() @ self.key_basis.float().T

    def values(self):
        return self.value_coef.float() @ self.value_basis.float().T

    def positions(self):
        return self.pos

    def nbytes(self):
        shared = held_bytes(self.key_coef, self.value_coef) if self.owns_coef else 0
        return shared + held_bytes(self.key_basis, self.value_basis, self.pos)


def shared_factor(xs: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    stacked = torch.cat([x.float() for x in xs], dim=-1)  # [L, g*D]
    _u, _s, vh = torch.linalg.svd(stacked, full_matrices=False)
    r = min(rank, vh.shape[0])
    basis = vh[:r].T  # [g*D, r]
    coef = (stacked @ basis).half()
    d = xs[0].shape[-1]
    return coef, [basis[i * d : (i + 1) * d].half() for i in range(len(xs))]


@register
@dataclass
class XKV(PromptEncoder):
    rank: int = 32
    group: int = 2

    name: ClassVar[str] = "xkv"
    family: ClassVar[str] = "low rank"
    paper: ClassVar[str] = "Chang et al. 2025, xKV: Cross-Layer SVD for KV-Cache Compression"
    summary: ClassVar[str] = "groups of adjacent layers share one low-rank coefficient matrix"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pending: dict[int, list] = {}

    def validate(self) -> None:
        require(self.rank >= 1, self.name, f"rank must be >= 1, got {self.rank}")
        require(self.group >= 1, self.name, f"group must be >= 1, got {self.group}")

    def compress(self, store, obs) -> None:
        if not obs.prefill:
            return
        first = obs.layer - obs.layer % self.group
        members = self._pending.setdefault(first, [])
        members.append(store)
        last = min(first + self.group, obs.n_layers) - 1
        if obs.layer != last:
            return
        stores = self._pending.pop(first)
        keys = [s.keys for s in stores]
        values = [s.values for s in stores]
        positions = stores[0].positions
        for h in range(stores[0].n_heads):
            kc, kbs = shared_factor([k[h] for k in keys], self.rank)
            vc, vbs = shared_factor([v[h] for v in values], self.rank)
            for i, s in enumerate(stores):
                s.encode(h, SharedLowRank(kc, kbs[i], vc, vbs[i], positions[h].clone(), i == 0))
