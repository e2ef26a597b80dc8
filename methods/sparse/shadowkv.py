"""ShadowKV (Sun et al. 2024, "ShadowKV: KV Cache in Shadows for High-Throughput
Long-Context LLM Inference").

After the prefill, per layer: the prompt's post-RoPE keys are un-rotated (exact) and the
pre-RoPE keys of all KV heads, side by side [L, Hkv * D], are factored by their SVD to rank
``rank`` (the paper: 160 of Llama-3-8B's 1024; clipped to the width); the values go to host
memory. The prompt (before its last ``local`` tokens, kept exactly) is cut into chunks of
``chunk`` tokens; each chunk's landmark is the mean of its post-RoPE keys per KV head. Chunks
whose keys sit far from their landmark (lowest minimum cosine similarity) are outliers: the
``outliers`` worst chunks of each head keep exact keys and values on the device and are read
at every step, with the local window and every token after the prompt. A decoding query
scores the landmarks (softmax per query head, pooled over the KV group: ``pool``), the top
``budget // chunk`` other chunks are read: their keys rebuilt from the factors (then RoPE at
their positions), their values fetched from the host (``ShadowStore``).

Bytes: held on the device = factors, landmarks, exact rows, tokens after the prompt; on the
host = the prompt's values; read per step = landmarks (selection), the chosen rows'
coefficients and each head's basis slice, the exact rows (device) and the chosen rows' values
(host).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.base import Selection, require
from methods.memory import held_bytes
from methods.registry import register
from methods.sparse.base import POOLS, SparseMethod, every_row, pool_group, top_with
from methods.sparse.rope import Rope
from methods.sparse.shadow_store import ShadowPrompt, ShadowStore


def factor_keys(pre: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of pre-RoPE keys [Hkv, L, D] of one layer: (coef [L, r], basis
    [Hkv * D, r], orthonormal columns), both float16, from the SVD of [L, Hkv * D]."""
    h, n, d = pre.shape
    x = pre.float().transpose(0, 1).reshape(n, h * d)
    _u, _s, vh = torch.linalg.svd(x, full_matrices=False)
    basis = vh[: min(rank, vh.shape[0])].T
    return (x @ basis).half(), basis.half()


def chunk_outliers(keys: torch.Tensor, chunk: int, n_out: int):
    """Landmarks [H, C, D] (mean key per chunk) and the ``n_out`` chunks per head [H, n_out]
    whose keys are least similar to their landmark (minimum cosine similarity)."""
    h, n, d = keys.shape
    grouped = keys.float()[:, : n // chunk * chunk].reshape(h, n // chunk, chunk, d)
    landmarks = grouped.mean(2)
    sim = torch.nn.functional.cosine_similarity(grouped, landmarks[:, :, None], dim=-1)
    worst = torch.argsort(sim.amin(-1), dim=-1)[:, :n_out]
    return landmarks, worst.sort(-1).values


@register
@dataclass
class ShadowKV(SparseMethod):
    rank: int = 160
    chunk: int = 8
    outliers: int = 48
    local: int = 32
    pool: str = "mean"

    name: ClassVar[str] = "shadowkv"
    paper: ClassVar[str] = (
        "Sun et al. 2024, ShadowKV: KV Cache in Shadows for High-Throughput Long-Context "
        "LLM Inference"
    )
    summary: ClassVar[str] = (
        "low-rank pre-RoPE keys, values on the host, chunk landmarks select, outliers exact"
    )

    def validate(self) -> None:
        super().validate()
        for name in ("rank", "chunk"):
            value = getattr(self, name)
            require(value >= 1, self.name, f"{name} must be >= 1, got {value}")
        for name in ("outliers", "local"):
            value = getattr(self, name)
            require(value >= 0, self.name, f"{name} must be >= 0, got {value}")
        require(self.pool in POOLS, self.name, f"pool must be max or mean, not '{self.pool}'")

    def setup(self, model) -> None:
        self._rope = Rope(model, self.name)

    def new_store(self, n_kv_heads: int, head_dim: int, dtype, device) -> ShadowStore:
        return ShadowStore(n_kv_heads, head_dim, dtype, device)

    def build(self, store: ShadowStore, obs) -> None:
        keys = store.dense_keys()  # [Hkv, L, D] post-RoPE, the prompt
        h, n, _ = keys.shape
        values = torch.stack(store.values)
        positions = store.positions[0].clone()
        rope = functools.partial(self._rope.apply, layer=obs.layer)
        pre = torch.stack([rope(keys[i], positions, inverse=True) for i in range(h)])
        coef, basis = factor_keys(pre, self.rank)
        n_chunked = max(0, n - self.local) // self.chunk * self.chunk
        n_chunks = n_chunked // self.chunk
        landmarks, worst = chunk_outliers(
            keys[:, :n_chunked], self.chunk, min(self.outliers, n_chunks)
        )
        offs = torch.arange(self.chunk, device=keys.device)
        local = torch.arange(n_chunked, n, device=keys.device)
        outlier_rows = (worst[:, :, None] * self.chunk + offs).reshape(h, -1)
        exact = torch.cat([outlier_rows, local.expand(h, -1)], 1).sort(-1).values
        take = exact[..., None].expand(-1, -1, keys.shape[-1])
        host = "cpu"  # offloaded: on CUDA this is host memory, read over the bus
        store.encode(
            ShadowPrompt(
                coef=coef,
                basis=basis,
                landmarks=landmarks.to(keys.dtype),
                outlier_chunks=worst.to(torch.int32),
                exact_rows=exact.to(torch.int32),
                exact_keys=torch.gather(keys, 1, take).clone(),
                exact_values=torch.gather(values, 1, take).clone(),
                values_host=values.to(host),
                positions=positions,
                chunk=self.chunk,
                rope=lambda x, p: rope(x, p).to(keys.dtype),
            )
        )

    def choose(self, store: ShadowStore, step) -> Selection:
        prompt = store.prompt
        if prompt is None:  # no prefill to encode (a one-token prompt)
            return every_row(store)
        lm = prompt.landmarks.float()  # [Hkv, C, D]
        q = step.query.float().reshape(store.n_heads, step.group, -1)
        probs = torch.softmax(q @ lm.transpose(1, 2) * step.scale, dim=-1)  # [Hkv, G, C]
        pooled = pool_group(probs.reshape(-1, lm.shape[1]), step.group, self.pool)
        device = lm.device
        offs = torch.arange(self.chunk, device=device)
        tail = torch.arange(prompt.n, store.n_tokens, device=device)
        rows = []
        for h in range(store.n_heads):
            score = pooled[h].clone()
            score[prompt.outlier_chunks[h].long()] = float("-inf")  # read anyway
            n_candidates = lm.shape[1] - prompt.outlier_chunks.shape[1]
            chosen = top_with(score, min(self.budget // self.chunk, n_candidates))
            chunk_rows = (chosen[:, None] * self.chunk + offs).reshape(-1)
            picked = torch.cat([chunk_rows, prompt.exact_rows[h].long(), tail])
            rows.append(torch.unique(picked))  # ascending; chunks and exact rows may meet
        return Selection(rows, page_size=1, select_bytes=held_bytes(prompt.landmarks))
