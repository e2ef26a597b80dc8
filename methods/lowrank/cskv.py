"""CSKV-style channel shrinking (Wang et al. 2024, "CSKV: Training-Efficient Channel
Shrinking for KV Cache in Long-Context Scenarios").

CSKV replaces each layer's key (and value) projection W by a low-rank pair A B and caches the
low-dimension features x A, one [r] vector per token for the whole layer (all KV heads
together), rebuilding the keys as (x A) B before RoPE. Its cache has two branches: a window
of the most recent tokens in full precision and the compressed features of everything older;
as tokens arrive, the oldest leave the window and are compressed.

What kvlens follows: per layer, the prompt's post-RoPE keys are un-rotated (RoPE is a
rotation, so exactly) and the pre-RoPE keys of all KV heads side by side, X [L, Hkv * D],
are projected onto an orthonormal basis B [Hkv * D, r]; the cache holds X B [L, r] and B
(float16) and rebuilds keys as RoPE(X B B^T) at the stored positions. Values likewise
(no RoPE), with ``value_rank``. The last ``window`` tokens stay in full precision; on every
decoding step the tokens that fall out of the window are projected onto the same bases and
join the compressed branch, so the window is always the newest ``window`` tokens.

Departures: CSKV initialises A, B from an SVD and then fine-tunes them offline on a layer-wise
reconstruction loss; kvlens trains nothing and takes B from the SVD of the prompt's own
(older-than-window) keys and values: B B^T is then the best rank-r projection of that part of
the prompt, uncentred, so it is a linear map as the paper's A B is. Because B comes from the
prompt and is not fused into the weights, B is stored and counted, once per layer. The
paper's "low-precision" compressed branch is held at 16 bits here (compose with a
quantisation method for fewer bits). ``rank`` counts channels of the whole layer (Hkv * D:
192 in SmolLM2); a rank of Hkv * D rebuilds the keys exactly, up to float16 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import EncodedStore, PromptEncoder
from methods.memory import held_bytes
from methods.registry import register
from methods.sparse.rope import Rope


def project(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(features x B [L, r], orthonormal basis B [C, r]) of x [L, C], float16, r = min(rank,
    C): B's columns are x's right singular vectors in order of singular value, completed by
    an orthonormal basis of the rest of the space where x has fewer than r directions (so a
    rank of C also represents the tokens that leave the window later, exactly)."""
    _u, _s, vh = torch.linalg.svd(x.float(), full_matrices=True)
    basis = vh[: min(rank, vh.shape[0])].T
    return (x.float() @ basis).half(), basis.half()


@dataclass
class ShrunkBranch:
    """One layer's compressed branch, shared by its KV heads: features and bases of the keys
    (pre-RoPE) and of the values, and the positions of the tokens held."""

    key_feat: torch.Tensor  # float16 [L_c, r_k]
    key_basis: torch.Tensor  # float16 [Hkv * D, r_k]
    value_feat: torch.Tensor  # float16 [L_c, r_v]
    value_basis: torch.Tensor  # float16 [Hkv * D, r_v]
    pos: torch.Tensor  # int32 [L_c]

    def absorb(self, keys_pre: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        """Project tokens that left the window ([n, Hkv * D] each) onto the fixed bases."""
        kf = (keys_pre.float() @ self.key_basis.float()).to(self.key_feat.dtype)
        vf = (values.float() @ self.value_basis.float()).to(self.value_feat.dtype)
        self.key_feat = torch.cat([self.key_feat, kf])
        self.value_feat = torch.cat([self.value_feat, vf])
        self.pos = torch.cat([self.pos, pos.to(self.pos.dtype)])

    def nbytes(self) -> int:
        return held_bytes(
            self.key_feat, self.key_basis, self.value_feat, self.value_basis, self.pos
        )


@dataclass
class ShrunkHead:
    """Head ``head``'s view of its layer's branch (an ``Encoding``); the first head counts
    the branch's bytes, the others count none."""

    branch: ShrunkBranch
    head: int
    head_dim: int
    rope: object  # callable(x [L, D], positions [L]) -> RoPE applied
    owner: bool

    def _block(self, basis: torch.Tensor) -> torch.Tensor:
        return basis[self.head * self.head_dim : (self.head + 1) * self.head_dim].float()

    def keys_pre_rope(self) -> torch.Tensor:
        return self.branch.key_feat.float() @ self._block(self.branch.key_basis).T

    def keys(self):
        return self.rope(self.keys_pre_rope(), self.branch.pos)

    def values(self):
        return self.branch.value_feat.float() @ self._block(self.branch.value_basis).T

    def positions(self):
        return self.branch.pos

    def nbytes(self):
        return self.branch.nbytes() if self.owner else 0


@register
@dataclass
class CSKV(PromptEncoder):
    rank: int = 64
    value_rank: int = -1  # -1: the same as rank
    window: int = 32

    name: ClassVar[str] = "cskv"
    family: ClassVar[str] = "low rank"
    paper: ClassVar[str] = (
        "Wang et al. 2024, CSKV: Training-Efficient Channel Shrinking for KV Cache in "
        "Long-Context Scenarios"
    )
    summary: ClassVar[str] = (
        "layer-wide low-rank pre-RoPE key and value features, a full-precision recent window"
    )

    def validate(self) -> None:
        require(self.rank >= 1, self.name, f"rank must be >= 1, got {self.rank}")
        require(
            self.value_rank == -1 or self.value_rank >= 1,
            self.name,
            f"value_rank must be >= 1 or -1, got {self.value_rank}",
        )
        require(self.window >= 0, self.name, f"window must be >= 0, got {self.window}")

    def setup(self, model) -> None:
        self._rope = Rope(model, self.name)

    def _unrotate(self, keys: torch.Tensor, pos: torch.Tensor, layer: int) -> torch.Tensor:
        return self._rope.apply(keys.float(), pos, layer, inverse=True)

    def compress(self, store: EncodedStore, obs) -> None:
        if obs.prefill:
            self._shrink_prompt(store, obs.layer)
        elif store.encodings[0] is not None:
            self._slide(store, obs.layer)

    def _shrink_prompt(self, store: EncodedStore, layer: int) -> None:
        keys, values, positions = store.keys, store.values, store.positions
        n_old = positions[0].numel() - self.window
        if n_old <= 0:
            return  # the whole prompt fits in the window: nothing to shrink
        pos = positions[0][:n_old].to(torch.int32).clone()
        pre = torch.cat([self._unrotate(k[:n_old], pos, layer) for k in keys], dim=-1)
        vals = torch.cat([v[:n_old].float() for v in values], dim=-1)
        v_rank = self.rank if self.value_rank == -1 else self.value_rank
        kf, kb = project(pre, self.rank)
        vf, vb = project(vals, v_rank)
        branch = ShrunkBranch(kf, kb, vf, vb, pos)
        d = keys[0].shape[-1]

        def rope(x, p):
            return self._rope.apply(x, p, layer)

        for h in range(store.n_heads):
            window = (keys[h][n_old:].clone(), values[h][n_old:].clone())
            window_pos = positions[h][n_old:].to(torch.int32).clone()
            store.encode(h, ShrunkHead(branch, h, d, rope, h == 0))
            store.tail_keys[h], store.tail_values[h] = window
            store.tail_pos[h] = window_pos

    def _slide(self, store: EncodedStore, layer: int) -> None:
        n_out = store.tail_pos[0].numel() - self.window
        if n_out <= 0:
            return
        branch = store.encodings[0].branch
        pos = store.tail_pos[0][:n_out]
        pre = torch.cat(
            [self._unrotate(k[:n_out], pos.long(), layer) for k in store.tail_keys], dim=-1
        )
        vals = torch.cat([v[:n_out].float() for v in store.tail_values], dim=-1)
        branch.absorb(pre, vals, pos)
        for h in range(store.n_heads):
            store.tail_keys[h] = store.tail_keys[h][n_out:].clone()
            store.tail_values[h] = store.tail_values[h][n_out:].clone()
            store.tail_pos[h] = store.tail_pos[h][n_out:].clone()
