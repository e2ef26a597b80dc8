"""ShadowKV's store (Sun et al. 2024, "ShadowKV: KV Cache in Shadows for High-Throughput
Long-Context LLM Inference"): after the prefill the prompt is held as

- on the device: the layer's pre-RoPE keys as a rank-r product ``coef`` [L, r] x ``basis``
  [Hkv * D, r] (16-bit; one factorisation for all KV heads of the layer), one landmark (mean
  post-RoPE key) per chunk and KV head, and the *exact* keys and values of each head's outlier
  chunks and of the local window (the prompt's last tokens);
- on the host: the prompt's values (fetched row by row for the selected chunks).

Tokens after the prompt are held exactly in the device buffers of a ``SparseStore`` (rows
``n_prompt`` onward). Nothing else of the prompt is kept: the full keys are gone, a read
rebuilds the selected rows' keys (coef x basis, then RoPE at their positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlens_kernels.sparse_decode import sparse_decode
from methods.base import Selection
from methods.memory import element_bytes, held_bytes
from methods.sparse.store import SparseStore


@dataclass
class ShadowPrompt:
    coef: torch.Tensor  # [L, r] 16-bit, device
    basis: torch.Tensor  # [Hkv * D, r] 16-bit, device
    landmarks: torch.Tensor  # [Hkv, n_chunks, D] device
    outlier_chunks: torch.Tensor  # [Hkv, n_out] int32 device
    exact_rows: torch.Tensor  # [Hkv, E] int32, ascending: outlier chunks' rows + local window
    exact_keys: torch.Tensor  # [Hkv, E, D] device
    exact_values: torch.Tensor  # [Hkv, E, D] device
    values_host: torch.Tensor  # [Hkv, L, D] host memory
    positions: torch.Tensor  # [L] int32
    chunk: int
    rope: object  # callable(x [n, D], positions [n]) -> post-RoPE x

    @property
    def n(self) -> int:
        return int(self.positions.numel())

    def rebuild(self, head: int, rows: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys [n, D] of prompt ``rows`` of KV head ``head``, from the factors."""
        d = self.exact_keys.shape[-1]
        basis = self.basis[head * d : (head + 1) * d].float()  # [D, r]
        pre = self.coef[rows].float() @ basis.T
        return self.rope(pre, self.positions[rows])

    def keys(self, head: int) -> torch.Tensor:
        """Every prompt key of ``head`` as held: rebuilt, the exact rows exact."""
        out = self.rebuild(head, torch.arange(self.n, device=self.coef.device))
        out[self.exact_rows[head].long()] = self.exact_keys[head].float()
        return out

    def values(self, head: int) -> torch.Tensor:
        out = self.values_host[head].to(self.coef.device).clone()
        out[self.exact_rows[head].long()] = self.exact_values[head]
        return out

    def device_nbytes(self) -> int:
        return held_bytes(
            self.coef, self.basis, self.landmarks, self.outlier_chunks, self.exact_rows,
            self.exact_keys, self.exact_values, self.positions,
        )  # fmt: skip


class ShadowStore(SparseStore):
    """A SparseStore until ``encode``; then the prompt is a ``ShadowPrompt`` and the device
    buffers hold only the tokens after it."""

    def __init__(self, n_kv_heads: int, head_dim: int, dtype, device) -> None:
        super().__init__(n_kv_heads, head_dim, dtype, device)
        self.prompt: ShadowPrompt | None = None

    def encode(self, prompt: ShadowPrompt) -> None:
        """Replace the prompt's rows (all the store holds now) with ``prompt``."""
        self.prompt = prompt
        h, _, d = self._keys.shape
        self._keys = self._keys.new_empty(h, 0, d)
        self._values = self._values.new_empty(h, 0, d)
        self._positions = self._positions.new_empty(h, 0)
        self._aux = {}
        self._lengths = [0] * h
        self._lengths_device = None

    @property
    def n_prompt(self) -> int:
        return 0 if self.prompt is None else self.prompt.n

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self._lengths[0]

    def lengths(self) -> list[int]:
        return [self.n_tokens] * self.n_heads

    def _joined(self, kind: str) -> list[torch.Tensor]:
        tails = getattr(super(), kind)
        if self.prompt is None:
            return tails
        if kind == "positions":
            return [torch.cat([self.prompt.positions, t]) for t in tails]
        part = self.prompt.keys if kind == "keys" else self.prompt.values
        return [torch.cat([part(h).to(t.dtype), t]) for h, t in enumerate(tails)]

    @property
    def keys(self) -> list[torch.Tensor]:
        return self._joined("keys")

    @property
    def values(self) -> list[torch.Tensor]:
        return self._joined("values")

    @property
    def positions(self) -> list[torch.Tensor]:
        return self._joined("positions")

    def dense_keys(self) -> torch.Tensor:
        return torch.stack(self.keys)

    def _split(self, head: int, rows: torch.Tensor):
        """(exact prompt rows' indices into the exact arrays, rebuilt prompt rows, tail rows)."""
        prompt, n = self.prompt, self.n_prompt
        p_rows, t_rows = rows[rows < n], rows[rows >= n] - n
        exact = prompt.exact_rows[head].long()
        is_exact = torch.isin(p_rows, exact)
        return torch.searchsorted(exact, p_rows[is_exact]), p_rows[~is_exact], t_rows

    def attend_selected(self, query: torch.Tensor, selection: Selection, scale: float):
        """Rebuild the selected chunks' keys, fetch their values from the host, and attend
        exactly over them, the exact rows and the selected tail rows (sparse decode over
        the compact rows)."""
        if self.prompt is None:
            return super().attend_selected(query, selection, scale)
        prompt, d = self.prompt, self._keys.shape[-1]
        ks, vs = [], []
        for h in range(self.n_heads):
            ex, sp, tail = self._split(h, selection.rows(h, self.n_tokens))
            ks.append(
                torch.cat(
                    [
                        prompt.exact_keys[h][ex].float(),
                        prompt.rebuild(h, sp),
                        self._keys[h, tail].float(),
                    ]
                )  # fmt: skip
            )
            vs.append(
                torch.cat(
                    [
                        prompt.exact_values[h][ex].float(),
                        prompt.values_host[h][sp.cpu()].to(query.device).float(),
                        self._values[h, tail].float(),
                    ]
                )  # fmt: skip
            )
        lengths = torch.tensor([[k.shape[0] for k in ks]], device=query.device)
        most = max(1, int(lengths.max()))
        kbuf = query.new_zeros(1, self.n_heads, most, d)
        vbuf = query.new_zeros(1, self.n_heads, most, d)
        for h, (k, v) in enumerate(zip(ks, vs)):
            kbuf[0, h, : k.shape[0]] = k
            vbuf[0, h, : v.shape[0]] = v
        return sparse_decode(query[None], kbuf, vbuf, lengths, scale=scale, max_length=most)[0]

    def read_nbytes(self, selection: Selection | None) -> tuple[int, int]:
        """Device: the rebuilt rows' coefficients and the head's slice of the basis, the exact
        rows' keys and values, the tail rows'; host: the rebuilt rows' values."""
        if self.prompt is None:
            return super().read_nbytes(selection)
        prompt = self.prompt
        d = self._keys.shape[-1]
        el = element_bytes(self._keys.dtype)
        r = prompt.coef.shape[1]
        device = host = 0
        for h in range(self.n_heads):
            rows = (
                torch.arange(self.n_tokens)
                if selection is None
                else selection.rows(h, self.n_tokens).cpu()
            )
            ex, sp, tail = self._split(h, rows.to(prompt.exact_rows.device))
            if sp.numel():
                device += sp.numel() * r * element_bytes(prompt.coef.dtype)
                device += d * r * element_bytes(prompt.basis.dtype)
            device += (ex.numel() + tail.numel()) * 2 * d * el
            host += sp.numel() * d * element_bytes(prompt.values_host.dtype)
        return device, host

    def host_nbytes(self) -> int:
        return 0 if self.prompt is None else held_bytes(self.prompt.values_host)

    def nbytes(self) -> int:
        """Device (factors, landmarks, exact rows, tail) and host (values) bytes held."""
        held = super().nbytes()
        if self.prompt is not None:
            held += self.prompt.device_nbytes() + self.host_nbytes()
        return held
