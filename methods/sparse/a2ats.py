"""A^2ATS (He et al. 2025, "A^2ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary
Position Embedding and Query-Aware Vector Quantization").

After the prefill the prompt, before its last ``local`` tokens, is *coded*: per KV head a
codebook of ``clusters`` vectors (k-means of the keys, each code the mean of its keys) and one
code index per token. A decoding query scores every coded token by its code's reconstruction
(q . c_code) and the best are read exactly (their full keys and values); the prompt's last
``local`` tokens and every token after the prompt are always read exactly.

- Windowed RoPE (``windowed``): a coded token's score does not depend on its position. Keys are
  coded before RoPE (the cache's post-RoPE keys un-rotated, exactly) and the query is taken
  off RoPE and rotated to a fixed distance of ``local`` positions from them, so every coded
  token is scored as if it sat just outside the local window (q_pre R(local) . k_pre). With
  ``windowed=False`` the post-RoPE keys are coded and the query is used as it is.
- Query-aware VQ (``query_aware``): the codebook minimises the error of the *scores*, not of
  the keys: E_q[(q . (k - c))^2] = (k - c)^T H (k - c) with H the second moment of the prompt's
  last ``calib`` queries of the KV group (in the coded frame; a small ridge keeps it definite).
  k-means runs on the keys mapped by a Cholesky factor of H (the codes), each code is then the
  mean of its keys (optimal under any fixed quadratic metric). Lloyd's iterations from a
  k-means++ start seeded by ``seed`` (``methods.sparse.squeezed.kmeans``).
- Retrieval: per query head, softmax over every row (coded rows by their approximate score,
  the always-read rows by their exact one), pooled over the KV group (``pool``); the always-read
  rows first, then the best coded rows fill the ``budget`` of each KV head.

Bytes, as the paper lays the cache out: the coded rows' keys and values are held in host memory
(offloaded; kvlens keeps them in the store's buffers so the exact attention reads them in
place, and counts them as host bytes), the codebook (16 bits), the codes (uint8 up to 256
codes, int16 up to 32767) and the exact rows on the device. A step reads the codebook and every
code (selection), the always-read rows from the device and the retrieved rows from the host.

Departures, stated: one codebook of whole head-dimension vectors per KV head and layer (the
paper's quantiser may split channels); the fixed RoPE distance is the local window's size;
the retrieval budget is a token count, as across the sparse family.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Selection, require
from methods.memory import element_bytes, held_bytes
from methods.registry import register
from methods.sparse.base import POOLS, SparseMethod, every_row, pool_group, top_with
from methods.sparse.rope import Rope
from methods.sparse.squeezed import kmeans
from methods.sparse.store import SparseStore
from probes.errors import KvlensError


def code_dtype(n_codes: int) -> torch.dtype:
    """The narrowest integer type that indexes ``n_codes`` codes."""
    if n_codes <= 256:
        return torch.uint8
    return torch.int16 if n_codes <= 32767 else torch.int32


def query_metric(queries: torch.Tensor) -> torch.Tensor:
    """Cholesky factor L [D, D] of H = mean q q^T (+ a 1e-4 * trace / D ridge) of ``queries``
    [N, D]: ||(k - c) @ L||^2 = (k - c)^T H (k - c), the mean squared score error."""
    q = queries.float()
    h = q.T @ q / q.shape[0]
    d = h.shape[0]
    ridge = 1e-4 * float(torch.trace(h)) / d + 1e-12
    return torch.linalg.cholesky(h + ridge * torch.eye(d, device=h.device))


def codebook_of(
    keys: torch.Tensor, n_codes: int, iters: int, seed: int, metric: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook [C, D] float32, codes [N] int64) of ``keys`` [N, D]: k-means of the keys
    mapped by ``metric`` (None: plain distance), each code the mean of its keys."""
    x = keys.float()
    basis = x if metric is None else x @ metric
    k = min(n_codes, x.shape[0])
    labels = kmeans(basis, k, iters, seed)
    counts = torch.bincount(labels, minlength=k)
    sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, x)
    return sums / counts.clamp(min=1)[:, None], labels


class A2atsStore(SparseStore):
    """A SparseStore whose first ``n_coded`` rows (the coded prompt) count as host memory."""

    def __init__(self, n_kv_heads: int, head_dim: int, dtype, device) -> None:
        super().__init__(n_kv_heads, head_dim, dtype, device)
        self.n_coded = 0

    def _row_bytes(self) -> int:
        return 2 * self._keys.shape[2] * element_bytes(self._keys.dtype)

    def host_nbytes(self) -> int:
        """The coded rows' keys and values (offloaded)."""
        return self.n_heads * self.n_coded * self._row_bytes()

    def read_nbytes(self, selection: Selection | None) -> tuple[int, int]:
        """(device, host): the always-read rows from the device, the coded rows read from the
        host (every row when ``selection`` is None)."""
        device = host = 0
        for h, n in enumerate(self._lengths):
            if selection is None:
                coded = self.n_coded
                device += (n - coded) * self._row_bytes()
            else:
                rows = selection.rows(h, n)
                coded = int((rows < self.n_coded).sum())
                device += (rows.numel() - coded) * self._row_bytes()
            host += coded * self._row_bytes()
        return device, host


@register
@dataclass
class A2ATS(SparseMethod):
    clusters: int = 256
    iters: int = 10
    local: int = 32
    windowed: bool = True
    query_aware: bool = True
    calib: int = 64
    pool: str = "mean"
    seed: int = 0

    name: ClassVar[str] = "a2ats"
    paper: ClassVar[str] = (
        "He et al. 2025, A^2ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary "
        "Position Embedding and Query-Aware Vector Quantization"
    )
    summary: ClassVar[str] = (
        "vector-quantised keys under windowed RoPE score the cache; the best rows read exactly"
    )

    def validate(self) -> None:
        super().validate()
        require(self.clusters >= 1, self.name, f"clusters must be >= 1, got {self.clusters}")
        require(self.iters >= 0, self.name, f"iters must be >= 0, got {self.iters}")
        require(self.local >= 0, self.name, f"local must be >= 0 tokens, got {self.local}")
        require(self.calib >= 1, self.name, f"calib must be >= 1 query, got {self.calib}")
        require(self.pool in POOLS, self.name, f"pool must be max or mean, not '{self.pool}'")

    def observation_window(self) -> int:
        return self.calib

    def setup(self, model) -> None:
        if self.windowed:
            self._rope = Rope(model, self.name)

    def new_store(self, n_kv_heads: int, head_dim: int, dtype, device) -> A2atsStore:
        return A2atsStore(n_kv_heads, head_dim, dtype, device)

    def _rotate(self, layer: int):
        rope = getattr(self, "_rope", None)
        if rope is None:
            raise KvlensError(f"{self.name}: windowed=True needs the model's RoPE (setup)")
        return functools.partial(rope.apply, layer=layer)

    def _to_window(self, x: torch.Tensor, pos: torch.Tensor, layer: int) -> torch.Tensor:
        """Post-RoPE rows [N, D] at ``pos`` [N] -> the same rows at distance ``local``."""
        rope = self._rotate(layer)
        pre = rope(x, pos, inverse=True)
        return rope(pre, torch.full_like(pos, self.local))

    def build(self, store: A2atsStore, obs) -> None:
        keys = store.dense_keys()  # [Hkv, L, D] post-RoPE, the prompt
        n = keys.shape[1]
        coded = max(0, n - self.local)
        if coded == 0:
            return
        positions = store.positions[0][:coded].to(torch.int64)
        books, codes = [], []
        for h in range(store.n_heads):
            k = keys[h, :coded]
            if self.windowed:
                k = self._rotate(obs.layer)(k, positions, inverse=True)
            metric = None
            if self.query_aware:
                q = obs.window_queries[h]  # [G, W, D] post-RoPE, the prompt's last W
                g, w, d = q.shape
                q = q.reshape(g * w, d)
                if self.windowed:
                    qpos = torch.arange(n - w, n, device=q.device).repeat(g)
                    q = self._to_window(q, qpos, obs.layer)
                metric = query_metric(q)
            book, labels = codebook_of(
                k, self.clusters, self.iters, self.seed + 7919 * obs.layer + h, metric
            )
            books.append(book)
            codes.append(labels)
        store.meta["codebook"] = torch.stack(books).to(keys.dtype)  # [Hkv, C, D]
        store.meta["codes"] = torch.stack(codes).to(code_dtype(books[0].shape[0]))  # [Hkv, Lc]
        store.n_coded = coded
        store.summarised = n

    def choose(self, store: A2atsStore, step) -> Selection:
        if "codebook" not in store.meta:  # nothing coded (a prompt within the local window)
            return every_row(store)
        keys = store.dense_keys()
        n, coded = keys.shape[1], store.n_coded
        book, codes = store.meta["codebook"].float(), store.meta["codes"].long()
        q = step.query.float()  # [Hq, D]
        exact = q.reshape(store.n_heads, step.group, -1) @ keys[:, coded:].float().transpose(1, 2)
        if self.windowed:
            pos = torch.full((q.shape[0],), step.n_seen - 1, device=q.device)
            q = self._to_window(q, pos, step.layer)
        q = q.reshape(store.n_heads, step.group, -1)
        per_code = q @ book.transpose(1, 2)  # [Hkv, G, C]
        approx = torch.gather(per_code, 2, codes[:, None].expand(-1, step.group, -1))
        logits = torch.cat([approx, exact], -1) * step.scale  # [Hkv, G, n]
        probs = torch.softmax(logits, dim=-1)
        pooled = pool_group(probs.reshape(-1, n), step.group, self.pool)
        always = torch.zeros(n, dtype=torch.bool, device=keys.device)
        always[coded:] = True
        pages = [top_with(pooled[h], self.budget, always) for h in range(store.n_heads)]
        select = held_bytes(store.meta["codebook"], store.meta["codes"])
        return Selection(pages, page_size=1, select_bytes=select)
