"""Keyformer (Adnan et al., 2024, "Keyformer: KV Cache Reduction through Key Tokens
Selection for Efficient Generative Inference").

Like H2O, but each query's contribution is a Gumbel-regularised softmax of its logits,
softmax((logit + g) / tau) with g ~ Gumbel(0, 1), which keeps tokens that lose attention
only by chance. Accumulated over the last ``window`` prompt queries and then every
generated token; the ``recent`` newest tokens are kept. The paper anneals tau over
decoding; kvlens keeps it fixed. Noise is seeded by (seed, layer, head, step). Eviction runs
at every step (``schedule=continuous``, the paper's) or once after prefill (``prefill``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.eviction.base import RecentWindowEviction
from methods.registry import register


@register
@dataclass
class Keyformer(RecentWindowEviction):
    window: int = 64
    tau: float = 1.0
    seed: int = 0

    name: ClassVar[str] = "keyformer"
    paper: ClassVar[str] = "Adnan et al. 2024, Keyformer: Key Tokens Selection"
    summary: ClassVar[str] = "Gumbel-regularised accumulated attention + recent window"

    def validate(self) -> None:
        super().validate()
        require(self.window >= 1, self.name, f"window must be >= 1, got {self.window}")
        require(self.tau > 0, self.name, f"tau must be > 0, got {self.tau}")

    def observation_window(self) -> int:
        return self.window

    def observe(self, store, obs):
        acc = store.aux_state("keyformer_score")
        for h in range(len(obs.positions)):
            logits = obs.window_logits(h)
            gen = torch.Generator().manual_seed(
                self.seed * 1_000_003 + obs.layer * 10_007 + h * 101 + obs.n_seen
            )
            u = torch.rand(logits.shape, generator=gen).to(logits.device).clamp(1e-10, 1 - 1e-10)
            gumbel = -torch.log(-torch.log(u))
            probs = torch.softmax((logits + gumbel) / self.tau, dim=-1)
            acc[h] += probs.sum(1).mean(0)

    def scores(self, store, obs, head):
        return store.aux["keyformer_score"][head]
