"""MiniCache (Liu et al., 2024, "MiniCache: KV Cache Compression in Depth Dimension").

From layer ``start`` on, adjacent layers (start, start+1), (start+2, start+3), ... share one
direction per token: each token's key (and value) is split into magnitude and direction, the
two layers' directions are interpolated by SLERP at t = 0.5 and stored once, and each layer
keeps its own magnitudes. Tokens whose directions differ too much (angle cosine below
``threshold``) are kept unmerged in both layers. The pair is merged once the second layer
has prefilled (attention during prefill is exact). Later tokens stay per layer. Bytes: the
shared directions count once, in the first layer of the pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import PromptEncoder
from methods.memory import held_bytes
from methods.registry import register


def slerp(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Spherical interpolation between unit vectors (rows); falls back to lerp when parallel."""
    cos = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    safe = sin.abs() > 1e-6
    wa = torch.where(
        safe,
        torch.sin((1 - t) * omega) / sin.where(safe, torch.ones_like(sin)),
        torch.full_like(sin, 1 - t),
    )
    wb = torch.where(
        safe, torch.sin(t * omega) / sin.where(safe, torch.ones_like(sin)), torch.full_like(sin, t)
    )
    out = wa * a + wb * b
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class Merged:
    """One layer's view of a merged pair: shared directions + own norms, and unmerged tokens."""

    direction_k: torch.Tensor  # [L_m, D] float16, shared with the partner layer
    direction_v: torch.Tensor
    norm_k: torch.Tensor  # [L_m] float16, this layer's own
    norm_v: torch.Tensor
    merged_pos: torch.Tensor
    own_k: torch.Tensor  # unmerged tokens, full precision
    own_v: torch.Tensor
    own_pos: torch.Tensor
    owns_direction: bool  # the first layer of the pair counts the shared bytes

    def keys(self):
        return torch.cat(
            [self.direction_k.float() * self.norm_k.float()[:, None], self.own_k.float()]
        )

    def values(self):
        return torch.cat(
            [self.direction_v.float() * self.norm_v.float()[:, None], self.own_v.float()]
        )

    def positions(self):
        return torch.cat([self.merged_pos, self.own_pos])

    def nbytes(self):
        shared = held_bytes(self.direction_k, self.direction_v) if self.owns_direction else 0
        return shared + held_bytes(
            self.norm_k, self.norm_v, self.merged_pos, self.own_k, self.own_v, self.own_pos
        )


@register
@dataclass
class MiniCache(PromptEncoder):
    start: int = -1  # -1: the middle layer
    threshold: float = 0.5

    name: ClassVar[str] = "minicache"
    family: ClassVar[str] = "merging"
    paper: ClassVar[str] = "Liu et al. 2024, MiniCache: KV Cache Compression in Depth Dimension"
    summary: ClassVar[str] = "adjacent layers share token directions (SLERP), keep own magnitudes"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pending: dict = {}  # first layer of a pair -> its store, until the partner prefills

    def validate(self) -> None:
        require(self.start >= -1, self.name, f"start must be a layer index or -1, got {self.start}")
        require(
            -1.0 <= self.threshold <= 1.0,
            self.name,
            f"threshold must be in [-1, 1], got {self.threshold}",
        )

    def compress(self, store, obs) -> None:
        if not obs.prefill:
            return
        start = obs.n_layers // 2 if self.start == -1 else self.start
        if obs.layer < start:
            return
        offset = (obs.layer - start) % 2
        if offset == 0:
            if obs.layer + 1 < obs.n_layers:
                self._pending[obs.layer] = store
            return
        first = self._pending.pop(obs.layer - 1, None)
        if first is None:
            return
        merge_pair(first, store, self.threshold)


def merge_pair(a, b, threshold: float) -> None:
    """Merge two layers' stores (same tokens) in place, head by head."""
    ka, va, pa = a.keys, a.values, a.positions
    kb, vb = b.keys, b.values
    for h in range(a.n_heads):
        na_k, nb_k = ka[h].float().norm(dim=-1), kb[h].float().norm(dim=-1)
        na_v, nb_v = va[h].float().norm(dim=-1), vb[h].float().norm(dim=-1)
        ua_k, ub_k = (
            ka[h].float() / na_k[:, None].clamp_min(1e-12),
            kb[h].float() / nb_k[:, None].clamp_min(1e-12),
        )
        ua_v, ub_v = (
            va[h].float() / na_v[:, None].clamp_min(1e-12),
            vb[h].float() / nb_v[:, None].clamp_min(1e-12),
        )
        close = ((ua_k * ub_k).sum(-1) >= threshold) & ((ua_v * ub_v).sum(-1) >= threshold)
        dir_k = slerp(ua_k[close], ub_k[close]).half()
        dir_v = slerp(ua_v[close], ub_v[close]).half()
        far = ~close
        a.encode(
            h,
            Merged(
                dir_k,
                dir_v,
                na_k[close].half(),
                na_v[close].half(),
                pa[h][close].clone(),
                ka[h][far].clone(),
                va[h][far].clone(),
                pa[h][far].clone(),
                True,
            ),
        )
        b.encode(
            h,
            Merged(
                dir_k,
                dir_v,
                nb_k[close].half(),
                nb_v[close].half(),
                pa[h][close].clone(),
                kb[h][far].clone(),
                vb[h][far].clone(),
                pa[h][far].clone(),
                False,
            ),
        )
