"""GemFilter (Shi et al., 2024, "Discovering the Gems in Early Layers: Accelerating
Long-Context LLMs with 1000x Input Token Reduction").

An early layer already knows which input tokens the answer needs. The prompt's last query at
the filter layer ``layer`` scores every token by its inner product with the token's key
(post-RoPE, summed over all query heads, smoothed by an average pool of width ``kernel``, as
in the paper's code); the ``budget`` best tokens, in their original order, are then
prefilled again through the whole model *alone*, and that second prefill is the cache every
later token reads. Every layer and KV head holds the same ``budget`` tokens, re-encoded in
their new, shorter context.

How it runs in kvlens: the first prefill goes through the compressed cache as usual (the
filter layer records its choice; the paper stops that pass at the filter layer, kvlens runs
the remaining layers too and discards them), then ``prepare`` (called by
``methods.evaluate.prefill_logits``, the one prefill path) empties the cache, prefills the
selected tokens and hands back their next-token logits in place of the first pass's.

Choices, each a parameter: ``positions=renumber`` gives the selected tokens positions
0..budget-1, as the paper does (later tokens follow at budget, budget+1, ...);
``positions=original`` keeps each token's position in the prompt (later tokens follow at the
prompt's length). ``layer=-1`` takes the layer at 40% of the depth (the paper's layer 13 of
32 for Llama 3.1 8B).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from methods.base import Observation, require
from methods.eviction.base import EvictionMethod
from methods.registry import register
from probes.compat import cache_arg

POSITIONS = ("renumber", "original")


def filter_scores(obs: Observation, kernel: int) -> torch.Tensor:
    """[L]: the last query's inner product with each key, summed over the layer's query
    heads, average-pooled over ``kernel`` neighbours."""
    score = sum(
        (q[:, -1].float() @ k.float().T).sum(0) for q, k in zip(obs.window_queries, obs.keys)
    )
    if kernel > 1:
        score = F.avg_pool1d(score[None, None], kernel, 1, kernel // 2)[0, 0]
    return score


@register
@dataclass
class GemFilter(EvictionMethod):
    layer: int = -1
    kernel: int = 5
    positions: str = "renumber"

    name: ClassVar[str] = "gemfilter"
    paper: ClassVar[str] = (
        "Shi et al. 2024, Discovering the Gems in Early Layers: Accelerating Long-Context "
        "LLMs with 1000x Input Token Reduction"
    )
    summary: ClassVar[str] = (
        "an early layer's last query picks the tokens, which alone are prefilled again "
        "(positions: renumber = paper | original)"
    )
    decode_needs_attention: ClassVar[bool] = False
    prepares: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.selected: torch.Tensor | None = None
        self._refilling = False

    def validate(self) -> None:
        super().validate()
        require(self.layer >= -1, self.name, f"layer must be a layer index or -1, got {self.layer}")
        require(
            self.kernel >= 1 and self.kernel % 2 == 1,
            self.name,
            f"kernel must be odd and >= 1, got {self.kernel}",
        )
        require(
            self.positions in POSITIONS,
            self.name,
            f"positions must be {' or '.join(POSITIONS)}, not '{self.positions}'",
        )

    def filter_layer(self, n_layers: int) -> int:
        return round(0.4 * (n_layers - 1)) if self.layer == -1 else self.layer

    def setup(self, model) -> None:
        n_layers = model.config.num_hidden_layers
        require(
            self.filter_layer(n_layers) < n_layers,
            self.name,
            f"layer must be < the model's {n_layers} layers, got {self.layer}",
        )

    def compress(self, store, obs: Observation) -> None:
        if self._refilling or not obs.prefill or obs.layer != self.filter_layer(obs.n_layers):
            return
        n = obs.positions[0].numel()
        if n > self.budget:
            top = torch.topk(filter_scores(obs, self.kernel), self.budget).indices
            self.selected = top.sort().values.cpu()

    def prepare(self, model, cache, context_ids: list[int], tokenizer) -> torch.Tensor | None:
        """Prefill the selected tokens alone into the emptied ``cache``; their logits."""
        if self.selected is None:
            return None  # the prompt fits the budget: the first prefill is the cache
        chosen = self.selected
        self.selected = None
        ids = torch.tensor([[context_ids[i] for i in chosen.tolist()]], device=model.device)
        counts = [layer.prefill_compressions for layer in cache.layers]
        for layer in cache.layers:
            layer.store, layer.is_initialized = None, False
            layer.n_seen, layer.prefilled = 0, False
        extra = {}
        if self.positions == "original":
            extra["position_ids"] = chosen[None].to(model.device)
        self._refilling = True
        try:
            out = model(input_ids=ids, **cache_arg(model, cache), use_cache=True, **extra)
        finally:
            self._refilling = False
        for layer, count in zip(cache.layers, counts):
            layer.prefill_compressions = count  # one compression, however many passes
            if self.positions == "original":
                for pos in layer.store.positions:
                    pos.copy_(chosen.to(pos.device, pos.dtype))
                layer.n_seen = len(context_ids)
        return out.logits[0, -1].float()
