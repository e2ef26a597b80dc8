"""The store of the sparse family: the whole cache is kept, each decoding step reads a part.

A ``SparseStore`` is a ``HeadStore`` (every token, per KV head, in capacity buffers; nothing
is evicted, so all heads hold the same rows) plus the method's summaries of it (Quest's
page minima and maxima, Squeezed Attention's centroids, ...) in ``meta``, counted in the
bytes held. ``attend_selected`` is a step's exact attention over the selected rows only,
read in place through ``kvlens_kernels.page_decode`` (Triton on CUDA, its reference on the CPU).
"""

from __future__ import annotations

import torch

from kvlens_kernels.page_decode import page_decode
from methods.base import Selection
from methods.cache import HeadStore
from methods.memory import element_bytes, held_bytes


def page_table(selection: Selection, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The selection as the kernel's page table: pages [1, Hkv, M] (padded), counts [1, Hkv]
    and M, the most pages any head reads."""
    counts = [int(p.numel()) for p in selection.pages]
    most = max(1, max(counts))
    table = torch.zeros(1, len(counts), most, dtype=torch.int32, device=device)
    for h, p in enumerate(selection.pages):
        table[0, h, : p.numel()] = p.to(device=device, dtype=torch.int32)
    return table, torch.tensor([counts], dtype=torch.int32, device=device), most


class SparseStore(HeadStore):
    """Every token kept; ``meta`` holds the method's summaries (counted as held bytes)."""

    def __init__(self, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        super().__init__(n_kv_heads, head_dim, dtype, device)
        self.meta: dict[str, torch.Tensor] = {}
        self.summarised = 0  # tokens the summaries in ``meta`` cover so far

    @property
    def n_tokens(self) -> int:
        return self._lengths[0]

    def dense_keys(self) -> torch.Tensor:
        """Keys of every held token [Hkv, L, D] (a view: no head was evicted)."""
        return self._keys[:, : self.n_tokens]

    def attend_selected(self, query: torch.Tensor, selection: Selection, scale: float):
        """Exact attention of one token's queries [Hq, D] over each KV head's selected rows."""
        table, counts, most = page_table(selection, query.device)
        lengths = torch.tensor([self._lengths], dtype=torch.int32, device=query.device)
        return page_decode(
            query[None], self._keys[None], self._values[None], lengths, table, counts,
            page_size=selection.page_size, scale=scale, max_pages=most,
        )[0]  # fmt: skip

    def read_nbytes(self, selection: Selection | None) -> tuple[int, int]:
        """(device, host) bytes the step's attention reads: the keys and values of the
        selected rows (every row when ``selection`` is None); nothing is on the host."""
        per_row = 2 * self._keys.shape[2] * element_bytes(self._keys.dtype)
        if selection is None:
            return sum(self._lengths) * per_row, 0
        rows = sum(selection.rows(h, n).numel() for h, n in enumerate(self._lengths))
        return rows * per_row, 0

    def host_nbytes(self) -> int:
        return 0

    def nbytes(self) -> int:
        """Every held row (keys, values, positions) and the method's summaries."""
        return super().nbytes() + held_bytes(*self.meta.values())
