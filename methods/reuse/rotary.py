"""Moving a cached chunk to new positions with the model's own rotary embedding (RoPE, Su et
al. 2021, RoFormer), as CacheBlend (Yao et al. 2025) re-rotates reused chunk keys.

RoPE rotates each pair of key channels by an angle proportional to the position, so a key
cached at position ``p`` is moved to ``p + d`` either by rotating it by the angle of ``d``
(the rotation delta: rotations compose) or by applying RoPE afresh at ``p + d`` to the
pre-RoPE key. Both use ``model.base_model.rotary_emb`` (its ``layer_type`` where RoPE
differs per layer, as in Gemma 3), so every RoPE family kvlens loads works the same way;
channels past the rotary dimension (partial rotary: Phi, GPT-NeoX) pass unchanged. RoPE kinds
whose frequencies depend on the sequence length (dynamic NTK) do not compose exactly.
"""

from __future__ import annotations

import inspect

import torch

from probes.errors import KvlensError


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Rotary:
    """The model's RoPE as functions of explicit positions."""

    def __init__(self, model) -> None:
        rotary = getattr(model.base_model, "rotary_emb", None)
        if rotary is None:
            raise KvlensError(
                f"chunk reuse needs a RoPE model (model.base_model.rotary_emb); "
                f"{type(model).__name__} has none"
            )
        self.rotary = rotary
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        wants_type = "layer_type" in inspect.signature(type(rotary).forward).parameters
        self.layer_types = getattr(cfg or model.config, "layer_types", None) if wants_type else None
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)

    def cos_sin(self, positions: torch.Tensor, layer: int, like: torch.Tensor):
        """cos, sin [T, R] of ``positions`` (R = the rotary channels) as the model applies them."""
        args = [like[None].float(), positions.reshape(1, -1).to(like.device)]
        if self.layer_types is not None:
            args.append(self.layer_types[layer])
        cos, sin = self.rotary(*args)
        return cos[0].float(), sin[0].float()

    def _turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = cos.shape[-1]
        rot, rest = x[..., :r].float(), x[..., r:]
        turned = rot * cos + _rotate_half(rot) * sin
        return torch.cat([turned.to(x.dtype), rest], dim=-1)

    def apply(self, keys_pre: torch.Tensor, positions: torch.Tensor, layer: int) -> torch.Tensor:
        """RoPE at ``positions`` [T] applied to pre-RoPE keys [H, T, D]."""
        cos, sin = self.cos_sin(positions, layer, keys_pre)
        return self._turn(keys_pre, cos, sin)

    def shift(self, keys: torch.Tensor, delta: int, layer: int) -> torch.Tensor:
        """Post-RoPE keys [H, T, D] moved by ``delta`` positions (the rotation of ``delta``;
        the model's attention scaling, if any, is already in the keys and not applied twice)."""
        if delta == 0:
            return keys
        pos = torch.full((keys.shape[1],), int(delta), dtype=torch.long)
        cos, sin = self.cos_sin(pos, layer, keys)
        return self._turn(keys, cos / self.scaling, sin / self.scaling)

    def unapply(self, keys: torch.Tensor, positions: torch.Tensor, layer: int) -> torch.Tensor:
        """Pre-RoPE keys recovered from post-RoPE keys [H, T, D] at ``positions`` [T]."""
        cos, sin = self.cos_sin(positions, layer, keys)
        s2 = self.scaling**2
        return self._turn(keys, cos / s2, -sin / s2)
