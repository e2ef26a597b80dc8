"""MatryoshkaKV-style orthogonal projection of keys and values (Lin et al. 2024,
"MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection").

MatryoshkaKV gives every layer and KV head an orthogonal matrix U [D, D] for its keys and one
for its values, initialised by PCA, and caches the first r coordinates K U[:, :r] (queries
are multiplied by the same U[:, :r]); columns are ordered so that every prefix is a usable
projection (nested, "Matryoshka"). It then tunes U with a distillation loss and searches
per layer and head for the rank that fits a budget.

kvlens keeps the PCA initialisation and trains nothing: per layer and head, U is the right
singular vectors of the prompt's own keys (uncentred: a linear map, as the paper's is), in
order of singular value, so truncating to r keeps the first r columns and rank r is the best
rank-r projection of the prompt. The cache holds K U_r [L, r] and U_r [D, r] (float16, U_r
counted: it comes from the prompt) and rebuilds K U_r U_r^T; values likewise.

Ranks (``allocate``): ``uniform`` gives every head ``rank`` (``value_rank`` for values);
``adaptive`` (default) stands in for the paper's searched rates without its loss: the same
total, ``rank`` times the number of (layer, head) pairs, is shared across all layers and
heads greedily by explained energy: each head gets its first component, then the components
with the largest share of their own head's energy (sigma_i^2 / sum sigma^2) are added, across
the whole model, until the total is spent. Keys and values are allocated separately. The
adaptive allocation waits for the last layer's prefill (it needs every head's spectrum).
A rank of head_dim keeps everything (exact up to float16 rounding). Tokens after the prompt
stay in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import PromptEncoder
from methods.lowrank.svd import LowRank
from methods.registry import register

ALLOCATIONS = ("adaptive", "uniform")


def principal(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(singular values [k], orthonormal directions U [D, k]) of x [L, D], k = min(L, D),
    in descending order of singular value."""
    _u, s, vh = torch.linalg.svd(x.float(), full_matrices=False)
    return s, vh.T


def share_ranks(spectra: list[torch.Tensor], total: int) -> list[int]:
    """Ranks per unit summing to ``total`` (clipped to [units, sum of widths]): each unit
    gets 1, then the components with the largest share of their unit's energy are added,
    ties to the earlier unit and component; within a unit the chosen ones are a prefix."""
    widths = [int(s.numel()) for s in spectra]
    total = max(len(spectra), min(total, sum(widths)))
    ranks = [min(1, w) for w in widths]
    shares, owner = [], []
    for i, s in enumerate(spectra):
        energy = s.double() ** 2
        share = energy / energy.sum().clamp_min(1e-300)
        shares.append(share[1:])
        owner.append(torch.full((max(0, s.numel() - 1),), i, dtype=torch.long))
    flat, who = torch.cat(shares), torch.cat(owner)
    order = torch.sort(-flat, stable=True).indices[: total - sum(ranks)]
    for i in who[order].tolist():
        ranks[i] += 1
    return ranks


@register
@dataclass
class MatryoshkaKV(PromptEncoder):
    rank: int = 32  # mean rank per head
    value_rank: int = -1  # -1: the same as rank
    allocate: str = "adaptive"

    name: ClassVar[str] = "matryoshka"
    family: ClassVar[str] = "low rank"
    paper: ClassVar[str] = (
        "Lin et al. 2024, MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection"
    )
    summary: ClassVar[str] = "per-head PCA projections of K and V, ranks shared out by energy"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pending: list[tuple] = []

    def validate(self) -> None:
        require(self.rank >= 1, self.name, f"rank must be >= 1, got {self.rank}")
        require(
            self.value_rank == -1 or self.value_rank >= 1,
            self.name,
            f"value_rank must be >= 1 or -1, got {self.value_rank}",
        )
        require(
            self.allocate in ALLOCATIONS,
            self.name,
            f"allocate must be one of {', '.join(ALLOCATIONS)}, got '{self.allocate}'",
        )

    def compress(self, store, obs) -> None:
        if not obs.prefill:
            return
        keys, values, positions = store.keys, store.values, store.positions
        heads = []
        for h in range(store.n_heads):
            ks, ku = principal(keys[h])
            vs, vu = principal(values[h])
            heads.append((store, h, keys[h], values[h], positions[h], ks, ku, vs, vu))
        self._pending.extend(heads)
        if self.allocate == "adaptive" and obs.layer != obs.n_layers - 1:
            return
        pending, self._pending = self._pending, []
        v_rank = self.rank if self.value_rank == -1 else self.value_rank
        if self.allocate == "adaptive":
            k_ranks = share_ranks([p[5] for p in pending], self.rank * len(pending))
            v_ranks = share_ranks([p[7] for p in pending], v_rank * len(pending))
        else:
            k_ranks = [min(self.rank, p[5].numel()) for p in pending]
            v_ranks = [min(v_rank, p[7].numel()) for p in pending]
        for (st, h, k, v, pos, _ks, ku, _vs, vu), rk, rv in zip(
            pending, k_ranks, v_ranks, strict=True
        ):
            kb, vb = ku[:, :rk], vu[:, :rv]
            st.encode(
                h,
                LowRank(
                    (k.float() @ kb).half(), kb.half(), (v.float() @ vb).half(), vb.half(),
                    pos.clone(),
                ),
            )  # fmt: skip
