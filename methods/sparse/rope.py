"""The model's own rotary embedding, applied to or taken off stored keys at their positions.

Methods that keep keys before RoPE (ShadowKV's low-rank pre-RoPE keys) un-rotate the cache's
post-RoPE keys exactly (RoPE is a rotation) and rotate rebuilt keys back at their positions.
The cos/sin tables come from the model's ``rotary_emb`` module, so scaled RoPE variants and
per-layer-type RoPE (Gemma 3's local and global layers) follow the model. Standard
rotate-half layout; channels past the rotary dimension (partial rotary) pass unchanged.
"""

from __future__ import annotations

import inspect

import torch

from probes.errors import KvlensError


class Rope:
    """``Rope(model).apply(x [L, D], positions [L], layer, inverse=False)``."""

    def __init__(self, model, method: str) -> None:
        rotary = getattr(model.base_model, "rotary_emb", None)
        if rotary is None:
            raise KvlensError(
                f"{method} needs a rotary embedding (model.base_model.rotary_emb); "
                f"{type(model).__name__} has none"
            )
        self.rotary = rotary
        takes_type = "layer_type" in inspect.signature(type(rotary).forward).parameters
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        self.layer_types = getattr(cfg or model.config, "layer_types", None) if takes_type else None

    def apply(
        self, x: torch.Tensor, positions: torch.Tensor, layer: int, inverse: bool = False
    ) -> torch.Tensor:
        args = [x[None].float(), positions.long()[None]]
        if self.layer_types is not None:
            args.append(self.layer_types[layer])
        cos, sin = self.rotary(*args)
        cos, sin = cos[0].float(), sin[0].float()
        r = cos.shape[-1]
        rot, rest = x[..., :r].float(), x[..., r:].float()
        half_a, half_b = rot.chunk(2, dim=-1)
        swapped = torch.cat([-half_b, half_a], dim=-1)  # rotate-half
        turned = rot * cos - swapped * sin if inverse else rot * cos + swapped * sin
        return torch.cat([turned, rest], dim=-1)
