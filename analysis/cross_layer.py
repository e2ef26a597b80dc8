"""Cross-layer similarity of keys and values, and shared low-rank structure.

MiniCache (Liu et al. 2024) merges adjacent layers' KV in the middle-to-deep layers because
their per-token states point in similar directions; it splits each vector into magnitude and
direction and merges only directions. kvlens reports, for every pair of layers, the mean
per-token cosine similarity (direction) and the mean magnitude ratio min/max (what the split
keeps apart), each over tokens and KV heads (vectors of head_dim). Departure (also in
``analysis.departures``): MiniCache merges only adjacent layers from mid-depth on and keeps
its least similar tokens unmerged; the mean over all tokens hides those, and the
``adjacent`` rows are its pairs. Linear CKA (Kornblith et al. 2019; xKV uses it for the
same question) compares whole representations, tokens as items. xKV (Chang et al. 2025)
observes that the dominant singular vectors of adjacent layers' keys are aligned, so a
group of layers stacked side by side needs a smaller rank than the layers separately:
``svd_energy`` gives the fraction of energy kept at each rank for single layers and for
stacked groups. ``umap_keys`` embeds one head's key vectors in 2-D (UMAP, McInnes et al.
2018, via umap-learn).
"""

from __future__ import annotations

import polars as pl
import torch

from probes.errors import KvlensError
from probes.trace import Trace


def _stack(trace: Trace, kind: str) -> tuple[list[int], torch.Tensor]:
    layers = [layer for layer in trace.layers if f"layers.{layer}.{kind}" in trace.tensors]
    if not layers:
        raise KvlensError(f"this trace has no {kind} tensors; probe without --no-kv")
    return layers, torch.stack(
        [trace.tensors[f"layers.{layer}.{kind}"].float() for layer in layers]
    )


def pair_similarity(trace: Trace, kind: str = "key") -> pl.DataFrame:
    """All layer pairs: mean per-token cosine and magnitude ratio over tokens and KV heads."""
    layers, x = _stack(trace, kind)  # [L, Hkv, T, D]
    norms = x.norm(dim=-1)  # [L, Hkv, T]
    unit = x / norms[..., None].clamp_min(1e-12)
    flat_unit = unit.flatten(1, 2)  # [L, Hkv*T, D]
    cos = torch.einsum("atd,btd->abt", flat_unit, flat_unit).mean(-1)
    n = norms.flatten(1)
    mag = (
        torch.minimum(n[:, None], n[None]) / torch.maximum(n[:, None], n[None]).clamp_min(1e-12)
    ).mean(-1)
    rows = []
    for i, a in enumerate(layers):
        for j, b in enumerate(layers):
            rows.append(
                {
                    "kind": kind,
                    "layer_a": a,
                    "layer_b": b,
                    "cosine": float(cos[i, j]),
                    "magnitude_ratio": float(mag[i, j]),
                    "adjacent": abs(a - b) == 1,
                }
            )
    return pl.DataFrame(rows)


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA between two [n, features] representations of the same n items."""
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    cross = (a.T @ b).norm() ** 2
    return float(cross / ((a.T @ a).norm() * (b.T @ b).norm()).clamp_min(1e-12))


def cka(trace: Trace, kind: str = "key") -> pl.DataFrame:
    """Linear CKA between every pair of layers (tokens as items, heads x channels as features)."""
    layers, x = _stack(trace, kind)
    feats = x.permute(0, 2, 1, 3).flatten(2)  # [L, T, Hkv*D]
    # linear_cka's terms, each layer's centring and self term computed once, not per pair
    # (the same operations on the same tensors: the same values, in a third of the products)
    centred = [f - f.mean(0, keepdim=True) for f in feats]
    own = [(c.T @ c).norm() for c in centred]
    # CKA is symmetric: each pair's product once (||A^T B|| = ||B^T A||), for both orders
    values = {}
    for i in range(len(layers)):
        for j in range(i + 1, len(layers)):
            cross = (centred[i].T @ centred[j]).norm() ** 2
            values[i, j] = values[j, i] = float(cross / (own[i] * own[j]).clamp_min(1e-12))
    rows = [
        {"kind": kind, "layer_a": a, "layer_b": b, "cka": values.get((i, j), 1.0)}
        for i, a in enumerate(layers)
        for j, b in enumerate(layers)
    ]
    return pl.DataFrame(rows)


def svd_energy(
    trace: Trace,
    kind: str = "key",
    group_sizes: tuple[int, ...] = (1, 2, 4),
    ranks: tuple[int, ...] = (8, 16, 32, 64),
) -> pl.DataFrame:
    """Fraction of squared singular values kept at rank r, for groups of adjacent layers
    stacked along features ([T, g*Hkv*D]): consecutive, non-overlapping groups of g of the
    captured layers, as xKV groups them (a ragged last group is left out)."""
    layers, x = _stack(trace, kind)
    feats = x.permute(0, 2, 1, 3).flatten(2)  # [L, T, Hkv*D]
    rows = []
    for g in group_sizes:
        for start in range(0, len(layers) - g + 1, g):
            stacked = torch.cat(list(feats[start : start + g]), dim=-1)
            # squared singular values = eigenvalues of the Gram matrix (features x features)
            s2 = torch.linalg.eigvalsh((stacked.T @ stacked).double()).flip(0).clamp_min(0)
            total = s2.sum().clamp_min(1e-12)
            cum = s2.cumsum(0) / total
            for r in ranks:
                rows.append(
                    {
                        "kind": kind,
                        "group_size": g,
                        "first_layer": layers[start],
                        "rank": r,
                        "energy": float(cum[min(r, cum.numel()) - 1]),
                    }
                )
    return pl.DataFrame(rows)


def umap_keys(
    trace: Trace,
    layer: int,
    kv_head: int,
    heavy: set[int] | None = None,
    max_points: int = 4096,
    seed: int = 0,
) -> pl.DataFrame:
    """2-D UMAP of one KV head's post-RoPE key vectors; one row per token."""
    import umap

    keys = trace.key(layer)[kv_head].float()  # [T, D]
    n = keys.shape[0]
    idx = torch.arange(n)
    if n > max_points:
        idx = torch.linspace(0, n - 1, max_points).round().long().unique()
    reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(idx) - 1), random_state=seed)
    xy = reducer.fit_transform(keys[idx].numpy())
    positions = idx.tolist()
    return pl.DataFrame(
        {
            "position": positions,
            "token": [trace.tokens[p] for p in positions],
            "x": xy[:, 0].tolist(),
            "y": xy[:, 1].tolist(),
            "heavy": [p in (heavy or set()) for p in positions],
        }
    )
