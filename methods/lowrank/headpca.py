"""KV-head merging by PCA (Yu et al. 2024, "Effectively Compress KV Heads for LLM").

The paper turns multi-head attention into grouped-query attention with fewer KV heads: the
caches of a group of g KV heads, side by side X = [K_1 | ... | K_g] [L, g * D], are
projected onto their top principal directions U [g * D, r] (r = D: one ordinary head), the
cache holds only the merged head X U [L, r], and each original head is read back as
X U U_i^T, where U_i [D, r] is head i's block of U (the paper fuses U into the key/query and
value/output projections). Values likewise. So a group of g heads costs one head.

kvlens takes U from the prompt itself (no calibration set, no fine-tuning): per layer and
group, the uncentred SVD of the group's keys (and of its values) after prefill, i.e. the best
rank-r linear map, which is what a projection fusable into the weights must be. The cache
holds the merged heads (float16 [L, r] per group, for keys and for values), the blocks U_i
(float16, counted: they come from the prompt, not from the weights), and the positions once
per group. ``heads_merged`` heads merge into one of ``rank`` channels (-1: head_dim); groups
are consecutive heads, the last one smaller when ``heads_merged`` does not divide the KV
heads. A rank of heads_merged * head_dim keeps everything: exact up to float16 rounding. A
group the rank would not shrink (a lone last head at rank >= head_dim) stays as it is, in
full precision.

Departures: the paper's special handling of RoPE (keys must be merged so the result still
commutes with the rotary embedding, because its merged heads are projected weights) is not
needed: kvlens merges the post-RoPE keys the cache holds and rebuilds them. Tokens after the
prompt stay in full precision per original head (the paper's fused projections would merge
them as they are produced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import PromptEncoder
from methods.memory import held_bytes
from methods.registry import register


def merge_heads(xs: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The merged head X U [L, r] and each head's block U_i [D, r] (float16) of the heads
    xs[i] [L, D], with U the top-r right singular vectors of X = [x_1 | ... | x_g]."""
    stacked = torch.cat([x.float() for x in xs], dim=-1)
    _u, _s, vh = torch.linalg.svd(stacked, full_matrices=False)
    basis = vh[: min(rank, vh.shape[0])].T  # [g * D, r], orthonormal columns
    d = xs[0].shape[-1]
    blocks = [basis[i * d : (i + 1) * d].half() for i in range(len(xs))]
    return (stacked @ basis).half(), blocks


@dataclass
class MergedHead:
    """One original head's view of its group's merged head (an ``Encoding``). The group's
    first head counts the merged heads and the positions; every head counts its blocks."""

    key_merged: torch.Tensor  # float16 [L, r], shared by the group
    key_block: torch.Tensor  # float16 [D, r], this head's
    value_merged: torch.Tensor
    value_block: torch.Tensor
    pos: torch.Tensor  # int32 [L], shared by the group
    owner: bool

    def keys(self):
        return self.key_merged.float() @ self.key_block.float().T

    def values(self):
        return self.value_merged.float() @ self.value_block.float().T

    def positions(self):
        return self.pos

    def nbytes(self):
        shared = held_bytes(self.key_merged, self.value_merged, self.pos) if self.owner else 0
        return shared + held_bytes(self.key_block, self.value_block)


@register
@dataclass
class HeadPCA(PromptEncoder):
    heads_merged: int = 2
    rank: int = -1  # -1: head_dim (a group of heads becomes one ordinary head)

    name: ClassVar[str] = "headpca"
    family: ClassVar[str] = "low rank"
    paper: ClassVar[str] = "Yu et al. 2024, Effectively Compress KV Heads for LLM"
    summary: ClassVar[str] = "groups of KV heads merged into one head by PCA of their K and V"

    def validate(self) -> None:
        require(
            self.heads_merged >= 1,
            self.name,
            f"heads_merged must be >= 1, got {self.heads_merged}",
        )
        require(
            self.rank == -1 or self.rank >= 1,
            self.name,
            f"rank must be >= 1 or -1 (head_dim), got {self.rank}",
        )

    def compress(self, store, obs) -> None:
        if not obs.prefill:
            return
        keys, values, positions = store.keys, store.values, store.positions
        d = keys[0].shape[-1]
        rank = d if self.rank == -1 else self.rank
        for first in range(0, store.n_heads, self.heads_merged):
            heads = range(first, min(first + self.heads_merged, store.n_heads))
            if len(heads) == 1 and rank >= d:
                continue  # nothing to merge away (a lone last head at rank >= head_dim)
            km, kbs = merge_heads([keys[h] for h in heads], rank)
            vm, vbs = merge_heads([values[h] for h in heads], rank)
            pos = positions[first].to(torch.int32).clone()
            for i, h in enumerate(heads):
                store.encode(h, MergedHead(km, kbs[i], vm, vbs[i], pos, i == 0))
