"""Leverage-score eviction: the query-agnostic score of Compactor (Chari and Van Durme 2025,
"Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores").

A key that many queries could single out is one that spans a direction the other keys do not
cover. The statistical leverage of row i of a head's key matrix K [L, D] measures exactly
that: l_i = k_i (K^T K)^+ k_i^T, the i-th diagonal entry of the projection onto K's column
space (equal to ||U_i||^2 for K's thin SVD U S V^T; the scores sum to rank(K)). Each KV head
keeps its ``budget`` keys of highest leverage, once after the prefill, and every later token;
nothing reads a query, so it suits a context compressed before its question is known.

``sketch=0`` computes the exact scores (a thin SVD of K, directions below numpy's
``matrix_rank`` tolerance at the keys' precision left out: cheap at head sizes of 64-256).
``sketch=s`` computes the approximate scores the paper is named for, in the standard
randomised way (Drineas et al. 2012): a Gaussian sketch S [s, L] / sqrt(s) of the rows, R from
the QR of S K, then l_i ~ ||k_i R^-1||^2 (seeded by ``seed``).

``sinks=n`` always keeps the first n positions (default 0, the leverage rule alone). Measured
on SmolLM2 (benchmarks/query_agnostic.py), the leverage rule drops position 0 in some layers
(every head of layer 5 at half the tokens of a 516-token prompt), whose attention sink then
goes missing; ``sinks=4`` is the setting most kvlens methods keep.

Departures, on purpose: Compactor also blends these scores with a non-causal attention score
of the context and calibrates per-head budgets; kvlens implements the leverage part alone (a
method of its own, composable with others' budgets by '+'), on the cached post-RoPE keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.eviction.base import EvictionMethod
from methods.registry import register


def leverage_scores(keys: torch.Tensor, sketch: int = 0, seed: int = 0) -> torch.Tensor:
    """[L, D] keys -> [L] leverage of each row (exact when ``sketch`` is 0). Computed on the
    CPU in float64 whatever the keys' device: CUDA's SVD fails to converge on some key matrices
    (seen on an H200), and one place keeps the scores the same on every machine."""
    k = keys.detach().to("cpu", torch.float64)
    if sketch <= 0:
        u, sv, _ = torch.linalg.svd(k, full_matrices=False)
        # the directions K spans, numpy's matrix_rank rule at the keys' own precision
        tol = sv.max() * max(k.shape) * torch.finfo(keys.dtype).eps
        return (u[:, sv > tol] ** 2).sum(-1).float()
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(sketch, k.shape[0], generator=g, dtype=k.dtype) / sketch**0.5
    _, r = torch.linalg.qr(s @ k)
    solved = torch.linalg.solve_triangular(r, k.T, upper=True, left=True).T  # k_i R^-1
    return (solved**2).sum(-1).float()


@register
@dataclass
class Compactor(EvictionMethod):
    sketch: int = 0
    seed: int = 0
    sinks: int = 0

    name: ClassVar[str] = "compactor"
    paper: ClassVar[str] = (
        "Chari and Van Durme 2025, Compactor: Calibrated Query-Agnostic KV Cache Compression "
        "with Approximate Leverage Scores"
    )
    summary: ClassVar[str] = (
        "keep the keys of highest statistical leverage, at prefill (query-agnostic)"
    )
    decode_needs_attention: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        require(self.sketch >= 0, self.name, f"sketch must be >= 0 rows, got {self.sketch}")
        require(self.sinks >= 0, self.name, f"sinks must be >= 0, got {self.sinks}")

    def protected(self, obs, head) -> torch.Tensor | None:
        return obs.positions[head] < self.sinks if self.sinks else None

    def scores(self, store, obs, head) -> torch.Tensor:
        keys = obs.keys[head]
        dim = keys.shape[-1]
        require(
            self.sketch == 0 or self.sketch >= dim,
            self.name,
            f"sketch must be 0 (exact) or >= the head size {dim} rows, got {self.sketch}",
        )
        return leverage_scores(keys, self.sketch, self.seed).to(keys.device)
