"""Storage of a quantised KV cache: packed codes per KV head, plus a full-precision residual.

Tokens arrive in a full-precision residual window. After each attention call the method
calls ``flush``: while the residual holds more than ``residual`` tokens, its oldest whole
groups of ``group`` tokens are quantised (``kvlens_kernels.quantize``: keys either per channel over
the group's tokens (KIVI) or per token, values per token) and appended to the code buffers.
An optional orthonormal ``rotation`` (e.g. Hadamard) is applied to keys and values before
quantisation and undone after dequantisation.

Everything lives in capacity buffers (grown by doubling) in the layout the quantised decode
kernel reads (``kvlens_kernels.quant_decode.QuantKV``); ``layout()`` hands them over without a copy.
Reading ``keys`` / ``values`` dequantises every stored block (the reference path). The bytes
reported are those of the codes, scales, zeros, residual and positions in use; dequantised
tensors are transient scratch.
"""

from __future__ import annotations

import dataclasses

import torch

from kvlens_kernels.quant_decode import QuantKV, dequantize_cache, quant_decode
from kvlens_kernels.quantize import empty_blocks, quantize_groups
from methods.memory import element_bytes
from probes.errors import KvlensError


def _grow(buf: torch.Tensor, rows: int) -> torch.Tensor:
    """``buf`` [H, C, ...] with capacity of at least ``rows`` along dim 1 (doubling)."""
    if rows <= buf.shape[1]:
        return buf
    out = buf.new_zeros(buf.shape[0], max(rows, 2 * buf.shape[1]), *buf.shape[2:])
    out[:, : buf.shape[1]] = buf
    return out


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
        self.key_bits, self.value_bits = key_bits, value_bits
        self.group, self.residual = group, residual
        self.key_grouping = key_grouping
        self.rotation = (
            None if rotation is None else rotation.to(device=device, dtype=torch.float32)
        )
        per_channel = key_grouping == "channel"
        h, d = n_heads, head_dim
        empty = empty_blocks(h, 0, d, key_bits, value_bits, group, per_channel, device)
        self._kc, self._ks, self._kz = empty.key_codes, empty.key_scale, empty.key_zero
        self._vc, self._vs, self._vz = empty.value_codes, empty.value_scale, empty.value_zero
        self._rk = torch.zeros(h, 0, d, dtype=dtype, device=device)
        self._rv = torch.zeros_like(self._rk)
        self._pos = torch.zeros(0, dtype=torch.int32, device=device)
        self.n_quant = 0
        self.n_residual = 0

    @property
    def n_heads(self) -> int:
        return self._rk.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.n_quant + self.n_residual

    def lengths(self) -> list[int]:
        return [self.n_tokens] * self.n_heads

    @property
    def positions(self) -> list[torch.Tensor]:
        return [self._pos[: self.n_tokens]] * self.n_heads

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """keys/values [H, T, D]; positions [T]."""
        t, r = keys.shape[1], self.n_residual
        self._rk, self._rv = _grow(self._rk, r + t), _grow(self._rv, r + t)
        self._rk[:, r : r + t] = keys
        self._rv[:, r : r + t] = values
        n = self.n_tokens
        if n + t > self._pos.shape[0]:
            self._pos = _grow(self._pos[None], n + t)[0]
        self._pos[n : n + t] = positions.to(torch.int32)
        self.n_residual += t

    def reserve(self, new_tokens: int) -> tuple[int, int]:
        """Grow every buffer now to hold ``new_tokens`` more tokens appended one at a time
        (each followed by ``flush``), so that no later append or flush reallocates (a captured
        decode step keeps the buffers' addresses). Returns the capacities (quantised tokens,
        residual tokens) that those steps can reach."""
        quant = self.n_quant + (self.n_residual + new_tokens) // self.group * self.group
        res = self.n_residual + min(new_tokens, self.residual + self.group) + 1
        self._rk, self._rv = _grow(self._rk, res), _grow(self._rv, res)
        self._pos = _grow(self._pos[None], self.n_tokens + new_tokens)[0]
        self._kc, self._vc = _grow(self._kc, quant), _grow(self._vc, quant)
        rows = quant // self.group if self.key_grouping == "channel" else quant
        self._ks, self._kz = _grow(self._ks, rows), _grow(self._kz, rows)
        self._vs, self._vz = _grow(self._vs, quant), _grow(self._vz, quant)
        return quant, res

    def flush(self) -> None:
        """Quantise the residual's oldest whole groups until at most ``residual`` tokens remain."""
        cut = max(0, self.n_residual - self.residual) // self.group * self.group
        if cut == 0:
            return
        blocks = quantize_groups(
            self._rotate(self._rk[:, :cut]),
            self._rotate(self._rv[:, :cut]),
            key_bits=self.key_bits,
            value_bits=self.value_bits,
            group=self.group,
            key_per_channel=self.key_grouping == "channel",
        )
        n, g = self.n_quant, self.group
        self._kc, self._vc = _grow(self._kc, n + cut), _grow(self._vc, n + cut)
        self._kc[:, n : n + cut] = blocks.key_codes
        self._vc[:, n : n + cut] = blocks.value_codes
        if self.key_grouping == "channel":
            rows = slice(n // g, (n + cut) // g)
            self._ks, self._kz = _grow(self._ks, rows.stop), _grow(self._kz, rows.stop)
        else:
            rows = slice(n, n + cut)
            self._ks, self._kz = _grow(self._ks, n + cut), _grow(self._kz, n + cut)
        self._ks[:, rows], self._kz[:, rows] = blocks.key_scale, blocks.key_zero
        self._vs, self._vz = _grow(self._vs, n + cut), _grow(self._vz, n + cut)
        self._vs[:, n : n + cut], self._vz[:, n : n + cut] = blocks.value_scale, blocks.value_zero
        left = self.n_residual - cut
        self._rk[:, :left] = self._rk[:, cut : self.n_residual].clone()
        self._rv[:, :left] = self._rv[:, cut : self.n_residual].clone()
        self.n_quant += cut
        self.n_residual = left

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rotation is None else x.float() @ self.rotation

    def layout(self) -> QuantKV:
        """The store's buffers as the decode kernel's [1, H, ...] layout (views, no copies)."""
        return QuantKV(
            self._kc[None], self._ks[None], self._kz[None],
            self._vc[None], self._vs[None], self._vz[None],
            self._rk[None], self._rv[None],
            n_quant=self.n_quant, n_residual=self.n_residual,
            key_bits=self.key_bits, value_bits=self.value_bits, group=self.group,
            key_per_channel=self.key_grouping == "channel",
        )  # fmt: skip

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [H, n, D] in the model's dtype: dequantised codes, then residual."""
        quantised = dataclasses.replace(self.layout(), n_residual=0)
        if self.rotation is None:
            k, v = dequantize_cache(quantised, self.dtype)
        else:
            k, v = dequantize_cache(quantised, torch.float32)
            k, v = (k @ self.rotation.T).to(self.dtype), (v @ self.rotation.T).to(self.dtype)
        r = self.n_residual
        return torch.cat([k[0], self._rk[:, :r]], 1), torch.cat([v[0], self._rv[:, :r]], 1)

    @property
    def keys(self) -> list[torch.Tensor]:
        return list(self._dequantized()[0].unbind(0))

    @property
    def values(self) -> list[torch.Tensor]:
        return list(self._dequantized()[1].unbind(0))

    @property
    def supports_decode(self) -> bool:
        """The decode kernel reads the codes directly unless a rotation must be undone."""
        return self.rotation is None

    def decode(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of one token's queries [Hq, D] over the cache, read as stored."""
        return quant_decode(query[None], self.layout(), scale=scale)[0]

    def quantized_tokens(self) -> int:
        return self.n_quant * self.n_heads

    def nbytes(self) -> int:
        n, r, h = self.n_quant, self.n_residual, self.n_heads
        per_channel = self.key_grouping == "channel"
        key_scale_rows = n // self.group if per_channel else n
        total = (self._kc.shape[2] + self._vc.shape[2]) * n * h  # codes
        total += 2 * 2 * key_scale_rows * self._ks[0, 0].numel() * h if n else 0  # key scale+zero
        total += 2 * 2 * n * h  # value scale + zero, fp16 per token
        total += 2 * r * self.head_dim * element_bytes(self._rk.dtype) * h  # residual K + V
        total += 4 * self.n_tokens * h  # int32 positions, per head
        if self.rotation is not None:
            total += self.rotation.numel() * 2  # one float16 rotation matrix per layer
        return total

    def keep(self, head: int, index: torch.Tensor) -> None:
        raise KvlensError("a quantised cache does not evict tokens")

    def aux_state(self, name: str, dtype=torch.float32):
        raise KvlensError("a quantised cache keeps no per-token method state")
