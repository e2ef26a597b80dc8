"""Storage of a quantised KV cache: packed codes per KV head, plus a full-precision residual.

Tokens arrive in a full-precision residual window. After each attention call the method
calls ``flush``: while the residual holds more than ``residual`` tokens, its oldest
``group`` tokens are quantised — keys either per channel over the group's tokens (KIVI) or
per token, values per token — and appended to stacked tensors of packed codes, float16
scales and zero points. An optional orthonormal ``rotation`` (e.g. Hadamard) is applied to
keys and values before quantisation and undone after dequantisation.

Reading (``keys`` / ``values``) dequantises every stored block in one vectorised step on each
attention call: that is the reference path. The bytes reported are those of the stored
codes, scales, zeros, residual and positions; the dequantised tensors are transient scratch.
"""

from __future__ import annotations

import torch

from methods.quant import Quantized, dequantize, quantize
from probes.errors import KvlensError


class QuantHeadStore:
    def __init__(
        self,
        n_heads: int,
        head_dim: int,
        dtype,
        device,
        *,
        key_bits: int,
        value_bits: int,
        group: int,
        residual: int,
        key_grouping: str = "channel",
        rotation: torch.Tensor | None = None,
    ) -> None:
        if key_grouping not in ("channel", "token"):
            raise ValueError("key_grouping must be channel or token")
        self.head_dim, self.dtype, self.device = head_dim, dtype, device
        self.key_bits, self.value_bits, self.group, self.residual = (
            key_bits,
            value_bits,
            group,
            residual,
        )
        self.key_grouping = key_grouping
        self.rotation = (
            None if rotation is None else rotation.to(device=device, dtype=torch.float32)
        )
        empty = torch.empty(0, head_dim, dtype=dtype, device=device)
        self.res_keys = [empty.clone() for _ in range(n_heads)]
        self.res_values = [empty.clone() for _ in range(n_heads)]
        self.pos = [torch.empty(0, dtype=torch.int32, device=device) for _ in range(n_heads)]
        self.qkeys: list[Quantized | None] = [None] * n_heads
        self.qvalues: list[Quantized | None] = [None] * n_heads

    @property
    def n_heads(self) -> int:
        return len(self.pos)

    def lengths(self) -> list[int]:
        return [int(p.numel()) for p in self.pos]

    @property
    def positions(self) -> list[torch.Tensor]:
        return self.pos

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        for h in range(self.n_heads):
            self.res_keys[h] = torch.cat([self.res_keys[h], keys[h]])
            self.res_values[h] = torch.cat([self.res_values[h], values[h]])
            self.pos[h] = torch.cat([self.pos[h], positions.to(torch.int32)])

    def flush(self) -> None:
        """Quantise the residual's oldest whole groups until at most ``residual`` tokens remain."""
        for h in range(self.n_heads):
            n_blocks = max(0, self.res_keys[h].shape[0] - self.residual) // self.group
            if n_blocks == 0:
                continue
            cut = n_blocks * self.group
            k = self._rotate(self.res_keys[h][:cut]).view(n_blocks, self.group, self.head_dim)
            v = self._rotate(self.res_values[h][:cut]).view(n_blocks, self.group, self.head_dim)
            qk = quantize(k, self.key_bits, dim=1 if self.key_grouping == "channel" else -1)
            qv = quantize(v, self.value_bits, dim=-1)
            self.qkeys[h] = _concat(self.qkeys[h], qk)
            self.qvalues[h] = _concat(self.qvalues[h], qv)
            self.res_keys[h] = self.res_keys[h][cut:].contiguous()
            self.res_values[h] = self.res_values[h][cut:].contiguous()

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() if self.rotation is None else x.float() @ self.rotation

    def _restore(self, q: Quantized | None) -> torch.Tensor:
        if q is None:
            return torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)
        x = dequantize(q).reshape(-1, self.head_dim)
        if self.rotation is not None:
            x = x @ self.rotation.T
        return x.to(self.dtype)

    @property
    def keys(self) -> list[torch.Tensor]:
        return [
            torch.cat([self._restore(self.qkeys[h]), self.res_keys[h]]) for h in range(self.n_heads)
        ]

    @property
    def values(self) -> list[torch.Tensor]:
        return [
            torch.cat([self._restore(self.qvalues[h]), self.res_values[h]])
            for h in range(self.n_heads)
        ]

    def quantized_tokens(self) -> int:
        return sum(0 if q is None else q.packed.shape[0] * q.packed.shape[1] for q in self.qkeys)

    def nbytes(self) -> int:
        total = 0
        for h in range(self.n_heads):
            for q in (self.qkeys[h], self.qvalues[h]):
                total += 0 if q is None else q.nbytes()
            for t in (self.res_keys[h], self.res_values[h], self.pos[h]):
                total += t.numel() * t.element_size()
        if self.rotation is not None:
            total += self.rotation.numel() * 2  # one float16 rotation matrix per layer
        return total

    def keep(self, head: int, index: torch.Tensor) -> None:
        raise KvlensError("a quantised cache does not evict tokens")

    def aux_state(self, name: str, dtype=torch.float32):
        raise KvlensError("a quantised cache keeps no per-token method state")


def _concat(old: Quantized | None, new: Quantized) -> Quantized:
    if old is None:
        return new
    return Quantized(
        torch.cat([old.packed, new.packed]),
        torch.cat([old.scale, new.scale]),
        torch.cat([old.zero, new.zero]),
        new.bits,
        new.n,
    )
