"""Chunk-reuse deviation (CacheBlend, Yao et al. 2025, section 3): how far reused keys/values
are from those of a full prefill of the same prompt, per layer and token, and how far the
question's attention moves. Pure: tensors in, polars DataFrames out.

Inputs per layer: keys/values [Hkv, T, D] of the context (full prefill and reused), and the
attention rows [Hq, Q, T_all] of the question's Q queries. ``segments[p]`` names position p's
segment (-1 header, i chunk i, -2 question).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch


def _offsets(segments: list[int]) -> list[int]:
    """Each position's index within its segment."""
    out, prev, at = [], None, 0
    for s in segments:
        at = at + 1 if s == prev else 0
        out.append(at)
        prev = s
    return out


def kv_deviation(
    full_keys: list[torch.Tensor],
    full_values: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    segments: list[int],
) -> pl.DataFrame:
    """One row per (layer, position): L2 distance of the reused key/value from the full
    prefill's (over KV heads and channels), and the same relative to the full one's norm."""
    n = full_keys[0].shape[1]
    seg = np.asarray(segments[:n])
    off = np.asarray(_offsets(segments)[:n])
    parts = []
    for layer, (fk, fv, k, v) in enumerate(zip(full_keys, full_values, keys, values)):
        dk = (k.float() - fk.float()).pow(2).sum((0, 2)).sqrt()
        dv = (v.float() - fv.float()).pow(2).sum((0, 2)).sqrt()
        nk = fk.float().pow(2).sum((0, 2)).sqrt().clamp_min(1e-12)
        nv = fv.float().pow(2).sum((0, 2)).sqrt().clamp_min(1e-12)
        parts.append(
            pl.DataFrame(
                {
                    "layer": np.full(n, layer),
                    "position": np.arange(n),
                    "segment": seg,
                    "offset": off,
                    "key_dev": dk.numpy(),
                    "value_dev": dv.numpy(),
                    "key_rel": (dk / nk).numpy(),
                    "value_rel": (dv / nv).numpy(),
                }
            )
        )
    return pl.concat(parts)


def attention_deviation(
    full_rows: list[torch.Tensor], rows: list[torch.Tensor], segments: list[int]
) -> pl.DataFrame:
    """One row per (layer, key position): the question's attention on that key (mean over
    query heads and question queries) with the full prefill and with reuse, and the mean
    absolute difference."""
    parts = []
    for layer, (fr, r) in enumerate(zip(full_rows, rows)):
        if fr is None or r is None:
            continue
        fr, r = fr.float(), r.float()
        n = fr.shape[-1]
        parts.append(
            pl.DataFrame(
                {
                    "layer": np.full(n, layer),
                    "position": np.arange(n),
                    "segment": np.asarray(segments[:n]),
                    "full": fr.mean((0, 1)).numpy(),
                    "reused": r.mean((0, 1)).numpy(),
                    "abs_diff": (r - fr).abs().mean((0, 1)).numpy(),
                }
            )
        )
    return pl.concat(parts)


def layer_summary(kv: pl.DataFrame, attn: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per layer: mean relative key/value deviation over chunk tokens and, with ``attn``, the
    total variation distance of the question's attention (half the summed |difference|)."""
    out = (
        kv.filter(pl.col("segment") >= 0)
        .group_by("layer")
        .agg(pl.col("key_rel").mean(), pl.col("value_rel").mean())
    )
    if attn is not None:
        tv = attn.group_by("layer").agg((pl.col("abs_diff").sum() / 2).alias("attention_tv"))
        out = out.join(tv, on="layer", how="left")
    return out.sort("layer")


def by_offset(kv: pl.DataFrame, column: str = "value_rel", max_offset: int = 32) -> pl.DataFrame:
    """Mean deviation by a token's index within its chunk (do first tokens deviate most?)."""
    return (
        kv.filter((pl.col("segment") >= 0) & (pl.col("offset") < max_offset))
        .group_by("offset")
        .agg(pl.col(column).mean())
        .sort("offset")
    )
