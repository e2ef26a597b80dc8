"""Shared work of every eviction method: per-head budgets, protected tokens, top-k, gather.

A method supplies ``scores`` (higher = keep) and, optionally, which tokens are protected
(sinks, a recent window) and per-head budgets. Scores are computed in float32: ties and
rounding in half precision would make the kept set depend on the dtype. Query heads of one
KV group are averaged into one score per KV head, since the group shares its keys.

When a method evicts is its ``schedule``: ``prefill`` compresses once, right after the first
multi-token call, and keeps every later token (a question appended to the context, each
generated token); ``continuous`` evicts again after every later call, so the cache stays at
its budget. The evict-while-decoding papers (H2O, TOVA, Scissorhands, Keyformer) define the
continuous schedule, and kvlens defaults to it for them; kvpress, the reference library,
compresses once at prefill (``schedule=prefill`` reproduces it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Method, Observation, require

SCHEDULES = ("prefill", "continuous")
AVERAGES = ("group", "layer")


@dataclass
class EvictionMethod(Method):
    """Keep at most ``budget`` tokens per KV head; evict the rest by a score."""

    budget: int = 128

    family: ClassVar[str] = "eviction"
    #: evict again at every decoding step (True), or only once after prefill (False)
    evict_while_decoding: ClassVar[bool] = False

    def validate(self) -> None:
        require(self.budget >= 1, self.name, f"budget must be >= 1 token, got {self.budget}")

    def head_budgets(self, obs: Observation) -> list[int]:
        """Tokens each KV head of this layer may keep."""
        return [self.budget] * len(obs.positions)

    def protected(self, obs: Observation, head: int) -> torch.Tensor | None:
        """Bool [L_h]: tokens never evicted while the budget allows (default: none)."""
        return None

    def observe(self, store, obs: Observation) -> None:
        """Update per-token state kept in ``store.aux`` (default: nothing)."""

    def scores(self, store, obs: Observation, head: int) -> torch.Tensor:
        """Float [L_h]: how much each stored token deserves to stay (higher keeps)."""
        raise NotImplementedError

    def evicts_now(self, obs: Observation) -> bool:
        """Whether this call's Observation triggers an eviction (always at prefill)."""
        return obs.prefill or self.evict_while_decoding

    def compress(self, store, obs: Observation) -> None:
        if obs.keys is not None:  # None on kernel decode steps (nothing to observe)
            self.observe(store, obs)
        if not self.evicts_now(obs):
            return
        budgets = self.head_budgets(obs)
        over = [h for h, budget in enumerate(budgets) if obs.positions[h].numel() > budget]
        chosen = self._select_together(store, obs, over, budgets)
        if chosen is None:  # each head's selection reads only that head's rows and state
            chosen = {h: self.select(store, obs, h, budgets[h]) for h in over}
        if hasattr(store, "keep_heads"):
            store.keep_heads(chosen)  # one gather per buffer when the heads keep alike
        else:
            for head, index in chosen.items():
                store.keep(head, index)

    def _select_together(
        self, store, obs: Observation, heads: list[int], budgets: list[int]
    ) -> dict[int, torch.Tensor] | None:
        """``select`` of every head at once, where it is this class's own rule and every head
        holds as many tokens and keeps as many (a decoding step of a continuous eviction):
        the same scores and guards per head, one top-k over the stacked rows (per row what
        ``torch.topk`` gives one row, ties included). None where that does not apply."""
        lengths = {int(obs.positions[h].numel()) for h in heads}
        if (
            type(self).select is not EvictionMethod.select
            or len(heads) < 2
            or len(heads) != len(budgets)
            or len(lengths) != 1
            or len({budgets[h] for h in heads}) != 1
        ):
            return None
        guards = [self.protected(obs, h) for h in heads]
        if any(g is None for g in guards) and not all(g is None for g in guards):
            return None
        score = torch.stack([self.scores(store, obs, h).float() for h in heads])
        if guards[0] is not None:
            guard = torch.stack(guards)
            pos = torch.stack([obs.positions[h] for h in heads]).float()
            score[guard] = 1e30 + pos[guard]
        keep = torch.topk(score, budgets[heads[0]], sorted=False).indices
        return dict(zip(heads, keep.unbind(0), strict=True))

    def select(self, store, obs: Observation, head: int, budget: int) -> torch.Tensor:
        """Indices of the tokens to keep: protected first, then the highest scores."""
        score = self.scores(store, obs, head).float().clone()
        guard = self.protected(obs, head)
        if guard is not None:
            # protected tokens outrank all others; among them, later positions win
            pos = obs.positions[head].float()
            score[guard] = 1e30 + pos[guard]
        return torch.topk(score, budget, sorted=False).indices


@dataclass
class ScheduledEviction(EvictionMethod):
    """Eviction whose schedule is a parameter: ``continuous`` (evict after every call, the
    cache held at its budget; the papers' definition) or ``prefill`` (compress once after the
    prefill and keep every later token, as kvpress does)."""

    schedule: str = "continuous"

    def validate(self) -> None:
        super().validate()
        require(
            self.schedule in SCHEDULES,
            self.name,
            f"schedule must be {' or '.join(SCHEDULES)}, not '{self.schedule}'",
        )

    @property
    def evict_while_decoding(self) -> bool:  # type: ignore[override]
        return self.schedule == "continuous"

    @property
    def decode_needs_attention(self) -> bool:  # type: ignore[override]
        # once compressed at prefill, decoding reads nothing: the store's kernel may run
        return self.schedule == "continuous"


@dataclass
class RecentWindowEviction(ScheduledEviction):
    """Eviction that always keeps the ``recent`` newest tokens (-1: half the budget) and fills
    the rest of the budget by score."""

    recent: int = -1

    def validate(self) -> None:
        super().validate()
        require(
            self.recent >= -1,
            self.name,
            f"recent must be >= 0 (or -1 for budget/2), got {self.recent}",
        )
        require(
            self.recent < self.budget,
            self.name,
            f"recent ({self.recent}) must be < budget ({self.budget})",
        )

    @property
    def n_recent(self) -> int:
        return self.budget // 2 if self.recent == -1 else self.recent

    def protected(self, obs: Observation, head: int) -> torch.Tensor:
        return recent_mask(obs, head, self.n_recent)


def recent_mask(obs: Observation, head: int, recent: int, sinks: int = 0) -> torch.Tensor:
    """Bool [L_h]: the first ``sinks`` positions and the last ``recent`` positions seen."""
    pos = obs.positions[head]
    guard = pos >= obs.n_seen - recent
    if sinks:
        guard |= pos < sinks
    return guard


def group_mean(x: torch.Tensor) -> torch.Tensor:
    """[G, L] per query head -> [L] per KV head."""
    return x.float().mean(0)


def head_mean(per_head: list[torch.Tensor], head: int, average: str) -> torch.Tensor:
    """One score per token for KV head ``head`` from per-query-head rows ``[G, L]``:
    ``group`` averages the head's own query group, ``layer`` every query head of the layer
    (all KV heads then hold the same positions, so their rows line up)."""
    if average == "group":
        return group_mean(per_head[head])
    return torch.cat([x.float() for x in per_head]).mean(0)
