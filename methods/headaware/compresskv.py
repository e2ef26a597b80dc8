"""CompressKV (Lin et al., 2025, "CompressKV: Semantic Retrieval Heads Know What Tokens are Not
Important Before Generation").

In a GQA model every KV head's eviction usually follows the votes of its own query group, and
heads that never look far back (local, sink heads) then throw away the tokens that matter.
CompressKV lets a few semantic retrieval heads per layer decide for all of them: the
``heads_per_layer`` query heads of each layer with the highest retrieval score choose, by
SnapKV's pooled observation-window votes averaged over those heads only, the tokens every
KV head of the layer keeps (plus the window itself).

Retrieval scores come from kvlens, as RazorAttention's and DuoAttention's do
(``methods.headaware.razor.head_scores``): the ``retrieval`` column (Wu et al.'s score) of a
saved ``kvlens retrieval-heads`` / ``kvlens heads`` table (``profile=PATH``), or, without a
table, echo + induction measured on the fly. The paper's second part, layer budgets set from
each layer's measured eviction error, is not reproduced: every layer keeps ``budget``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import Observation, require
from methods.eviction.base import recent_mask
from methods.eviction.snapkv import SnapKV
from methods.headaware.razor import head_scores
from methods.registry import register


def chosen_heads(scores, n_layers: int, per_layer: int) -> dict[int, list[int]]:
    """Per layer, the ``per_layer`` query heads of highest score (ties: lower head first)."""
    out = {}
    for layer in range(n_layers):
        rows = scores.filter(layer=layer).sort(["score", "head"], descending=[True, False])
        out[layer] = [int(h) for h in rows["head"].head(per_layer)]
    return out


@register
@dataclass
class CompressKV(SnapKV):
    heads_per_layer: int = 2
    profile: str = ""

    name: ClassVar[str] = "compresskv"
    family: ClassVar[str] = "head-aware"
    paper: ClassVar[str] = (
        "Lin et al. 2025, CompressKV: Semantic Retrieval Heads Know What Tokens are Not "
        "Important Before Generation"
    )
    summary: ClassVar[str] = (
        "each layer's top retrieval heads choose, by their window votes, the tokens every KV "
        "head keeps"
    )

    def validate(self) -> None:
        super().validate()
        require(
            self.heads_per_layer >= 1,
            self.name,
            f"heads_per_layer must be >= 1, got {self.heads_per_layer}",
        )

    def setup(self, model) -> None:
        column = "retrieval" if self.profile else "echo+induction"
        scores = head_scores(model, self.profile, column)
        self.retrieval_heads = chosen_heads(
            scores, model.config.num_hidden_layers, self.heads_per_layer
        )

    def scores(self, store, obs: Observation, head: int) -> torch.Tensor:
        votes = torch.cat([w.float() for w in obs.window])  # [Hq, L]: the layer's query heads
        score = votes[self.retrieval_heads[obs.layer]].mean(0)
        if self.kernel > 1:
            inside = recent_mask(obs, head, self.window)
            pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
            outside = score.masked_fill(inside, 0.0)[None, None]
            pooled = pool(outside, self.kernel, 1, self.kernel // 2)[0, 0]
            score = torch.where(inside, score, pooled)
        return score
