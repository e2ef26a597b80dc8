"""Naive chunk reuse: concatenate independently prefilled chunk caches, keys re-rotated to
their new positions, and recompute nothing (the baseline of CacheBlend, Yao et al. 2025, and
of PromptCache-style modular reuse, Gim et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.reuse.base import Context, ReuseMethod, RunOutput, uniform_schedule


@dataclass
class NaiveReuse(ReuseMethod):
    name: ClassVar[str] = "naive"
    paper: ClassVar[str] = "Yao et al. 2025, CacheBlend (its full-reuse baseline)"
    summary: ClassVar[str] = "chunk caches prefilled alone, re-rotated and concatenated"

    def run(self, ctx: Context) -> RunOutput:
        cache = ctx.assemble(ctx.alone())
        none = torch.empty(0, dtype=torch.long)
        logits = ctx.finish(cache, none)
        return cache, logits, uniform_schedule(ctx, none), {}
