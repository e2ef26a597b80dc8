"""CaM (Zhang et al., ICML 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference").

Eviction as StreamingLLM does it (keep the first ``sinks`` tokens and the newest ones up to
``budget``), but an evicted token's value is not thrown away: it is merged into the values of
the ``merge`` tokens that follow it, each getting ``v_i / merge``, with probability
``p_i = a_i / mean(a_j over those targets)`` (clipped to 1), where ``a`` is the attention
the current query pays. Keys are left as they are. In expectation the attention-weighted sum
of values the query reads is unchanged: the targets carry ``p_i * sum_j a_j v_i / merge =
a_i v_i``, the evicted token's own contribution (exactly so whenever ``p_i <= 1``).

As in the paper's streaming code, tokens leave one at a time, oldest first, and a value that
already received merges carries them on when its own turn comes. kvlens compresses once,
after the prefill, with the attention of the prompt's last query (averaged over the KV group's
query heads: they share the value), and keeps every later token.

Choices, each a parameter: ``sample=true`` draws the merge mask (the paper); ``sample=false``
merges each evicted value with weight ``p_i``, the expectation, so that runs are
deterministic and the weighted sum is preserved exactly. ``seed`` fixes the draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Observation, require
from methods.eviction.base import EvictionMethod, group_mean
from methods.registry import register


def merge_weights(attn: torch.Tensor, evicted: torch.Tensor, merge: int) -> torch.Tensor:
    """Per stored token, the merge probability ``a_i / mean(a over its next merge tokens)``
    (0 for kept tokens), clipped to [0, 1]."""
    n = attn.numel()
    idx = torch.arange(n, device=attn.device)
    csum = torch.cat([attn.new_zeros(1), attn.cumsum(0)])
    hi = (idx + 1 + merge).clamp(max=n)
    count = (hi - idx - 1).clamp(min=1)
    mean_next = (csum[hi] - csum[idx + 1]) / count
    p = torch.where(mean_next > 0, attn / mean_next.clamp_min(1e-30), torch.ones_like(attn))
    return torch.where(evicted, p.clamp(0.0, 1.0), torch.zeros_like(p))


def cam_values(values: torch.Tensor, weight: torch.Tensor, merge: int) -> torch.Tensor:
    """Values after every token with ``weight > 0`` (oldest first) has added ``weight/merge``
    times its current value to each of the ``merge`` tokens after it.

    The chain is linear: ``V' = V + C V'`` with ``C[j, i] = weight_i / merge`` for
    ``i < j <= i + merge``. Solved block by block (blocks of ``merge`` rows): each block
    depends only on itself and the block before, one small unit-triangular solve each.
    """
    out = values.float().clone()
    n = out.shape[0]

    def band(r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        gap = torch.arange(r0, r1, device=out.device)[:, None] - torch.arange(
            c0, c1, device=out.device
        )
        return torch.where((gap >= 1) & (gap <= merge), weight[None, c0:c1] / merge, 0.0)

    for r0 in range(0, n, merge):
        r1, c0 = min(n, r0 + merge), max(0, r0 - merge)
        rhs = out[r0:r1] + band(r0, r1, c0, r0) @ out[c0:r0]
        lower = torch.eye(r1 - r0, device=out.device) - band(r0, r1, r0, r1)
        out[r0:r1] = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    return out


@register
@dataclass
class CaM(EvictionMethod):
    sinks: int = 4
    merge: int = 32
    sample: bool = True
    seed: int = 0

    name: ClassVar[str] = "cam"
    family: ClassVar[str] = "merging"
    paper: ClassVar[str] = (
        "Zhang et al. 2024, CaM: Cache Merging for Memory-efficient LLMs Inference"
    )
    summary: ClassVar[str] = (
        "StreamingLLM eviction; each evicted value merged into the next tokens' values with "
        "probability set by its attention (sample: true = paper | false = expectation)"
    )
    decode_needs_attention: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        require(self.sinks >= 0, self.name, f"sinks must be >= 0, got {self.sinks}")
        require(
            self.sinks < self.budget,
            self.name,
            f"sinks ({self.sinks}) must be < budget ({self.budget})",
        )
        require(self.merge >= 1, self.name, f"merge must be >= 1 token, got {self.merge}")

    def protected(self, obs: Observation, head: int) -> torch.Tensor:
        pos = obs.positions[head]
        return (pos < self.sinks) | (pos >= obs.n_seen - (self.budget - self.sinks))

    def scores(self, store, obs, head):
        return torch.zeros(obs.positions[head].numel(), device=obs.positions[head].device)

    def select(self, store, obs, head, budget):
        keep = self.protected(obs, head).nonzero().squeeze(1)
        evicted = torch.ones(obs.positions[head].numel(), dtype=torch.bool, device=keep.device)
        evicted[keep] = False
        weight = merge_weights(group_mean(obs.last[head]), evicted, self.merge)
        if self.sample:
            g = torch.Generator(device="cpu").manual_seed(self.seed + 7919 * obs.layer + head)
            weight = torch.bernoulli(weight.cpu(), generator=g).to(weight.device)
        merged = cam_values(store.values[head], weight, self.merge)
        store.values[head][:] = merged.to(store.values[head].dtype)
        return keep
