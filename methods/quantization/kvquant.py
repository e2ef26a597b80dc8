"""KVQuant-style keys (Hooper et al., 2024, "KVQuant: Towards 10 Million Context Length LLM
Inference with KV Cache Quantization").

Keys are quantised *before* RoPE, per channel, where their outlier channels are stable: the
cache un-rotates the prompt's post-RoPE keys (RoPE is a rotation, so this is exact), and for
each channel picks non-uniform levels from the prompt's own distribution (its quantiles at
i / (2^bits - 1), minimum and maximum included, a stand-in for KVQuant's offline k-means),
computed after setting aside the largest-magnitude ``outliers`` fraction of entries, which
are kept exactly (dense-and-sparse). On read it dequantises and
re-applies RoPE at the stored positions. Values are quantised per token, uniformly. Works for
models with standard (rotate-half) RoPE, such as SmolLM2 and Llama.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import require
from methods.encoded import PromptEncoder
from methods.memory import held_bytes
from methods.quant import Quantized, dequantize, pack, quantize, unpack
from methods.registry import register
from probes.errors import KvlensError


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


@dataclass
class NonUniformKeys:
    codes: torch.Tensor  # packed uint8 [L, D*bits/8]
    levels: torch.Tensor  # float16 [2^bits, D]
    sparse_index: torch.Tensor  # int32 flat
    sparse_value: torch.Tensor  # float16
    bits: int
    vals: Quantized
    pos: torch.Tensor
    rope: object  # callable(x, positions, inverse) -> x

    def keys(self):
        d = self.levels.shape[1]
        codes = unpack(self.codes, self.bits, d).long()  # [L, D]
        pre = torch.gather(self.levels.float().T, 1, codes.T).T  # level per (token, channel)
        flat = pre.reshape(-1)
        flat[self.sparse_index.long()] = self.sparse_value.float()
        return self.rope(pre, self.pos.long(), inverse=False)

    def values(self):
        return dequantize(self.vals)

    def positions(self):
        return self.pos

    def nbytes(self):
        return (
            held_bytes(self.codes, self.levels, self.sparse_index, self.sparse_value, self.pos)
            + self.vals.nbytes()
        )


@register
@dataclass
class KVQuant(PromptEncoder):
    bits: int = 4
    outliers: float = 0.01

    name: ClassVar[str] = "kvquant"
    family: ClassVar[str] = "quantisation"
    paper: ClassVar[str] = "Hooper et al. 2024, KVQuant"
    summary: ClassVar[str] = "pre-RoPE per-channel non-uniform keys, 1% outliers kept exactly"

    def validate(self) -> None:
        require(self.bits in (2, 4, 8), self.name, f"bits must be 2, 4 or 8, got {self.bits}")
        require(
            0.0 <= self.outliers < 0.5,
            self.name,
            f"outliers must be in [0, 0.5), got {self.outliers}",
        )

    def setup(self, model) -> None:
        rotary = getattr(model.base_model, "rotary_emb", None)
        if rotary is None:
            raise KvlensError(
                f"kvquant needs a rotary embedding (model.base_model.rotary_emb); "
                f"{type(model).__name__} has none"
            )
        self._rotary = rotary
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        # models with per-layer RoPE (Gemma 3: local and global layers) name the layer's type
        wants_type = "layer_type" in inspect.signature(type(rotary).forward).parameters
        self._layer_types = (
            getattr(cfg or model.config, "layer_types", None) if wants_type else None
        )

    def rope(
        self, x: torch.Tensor, positions: torch.Tensor, inverse: bool, layer: int = 0
    ) -> torch.Tensor:
        """Apply (or undo) the model's RoPE at ``positions`` to x [L, D]; channels past the
        rotary dimension (partial rotary) pass unchanged."""
        args = [x[None].float(), positions[None]]
        if self._layer_types is not None:
            args.append(self._layer_types[layer])
        cos, sin = self._rotary(*args)
        cos, sin = cos[0].float(), sin[0].float()
        r = cos.shape[-1]
        rot, rest = x[..., :r], x[..., r:]
        turned = (
            rot * cos - _rotate_half(rot) * sin if inverse else rot * cos + _rotate_half(rot) * sin
        )
        return torch.cat([turned, rest], dim=-1)

    def encode_head(self, obs, head, keys, values, positions):
        rope = functools.partial(self.rope, layer=obs.layer)
        pre = rope(keys.float(), positions.long(), inverse=True)  # [L, D]
        n_out = int(self.outliers * pre.numel())
        idx = (
            torch.topk(pre.abs().reshape(-1), n_out).indices
            if n_out
            else torch.empty(0, dtype=torch.long)
        )
        # levels at evenly spaced quantiles from the minimum to the maximum (after removing
        # the sparse outliers): dense where the channel's values are dense, covering its range
        body = pre.clone().reshape(-1)
        body[idx] = float("nan")
        q = torch.linspace(0.0, 1.0, 2**self.bits, device=pre.device)
        levels = torch.nanquantile(body.view_as(pre), q, dim=0)  # [2^b, D]
        codes = (pre[:, None, :] - levels[None]).abs().argmin(1).to(torch.uint8)  # [L, D]
        return NonUniformKeys(
            pack(codes, self.bits),
            levels.half(),
            idx.to(torch.int32),
            pre.reshape(-1)[idx].half(),
            self.bits,
            quantize(values, self.bits, -1),
            positions.clone(),
            rope,
        )
