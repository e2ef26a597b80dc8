"""Outlier channels of keys and values, and what they mean for quantisation.

The evidence behind KIVI (Liu et al. 2024: keys have a few channels of large magnitude, so
quantise keys per channel and values per token), KVQuant (Hooper et al. 2024: the outliers
sit in fixed channels of *pre-RoPE* keys; RoPE smears them) and RotateKV / QuaRot
(a Hadamard rotation spreads outliers over all channels). Per layer, KV head and channel:
max |x|, mean |x| and excess kurtosis over tokens.

Outlier rule (stated, not learned, and kvlens's own: the papers show the magnitudes but set
no threshold): a channel is an outlier when its mean |x| is at least ``ratio`` (default 4)
times the median mean |x| of the channels of its head. Persistence:
the fraction of tokens on which the channel is among that token's top ``top`` channels by
|x| (default the top 4 of head_dim); a persistent outlier scores close to 1.

Quantisation error: asymmetric uniform round-to-nearest with min/max per group, groups of
``group`` tokens along one channel ("per channel", KIVI's keys) or all channels of one token
("per token"), at 2 and 4 bits, with and without a normalised Hadamard rotation of the
channels. Reported as relative Frobenius error ||x - q(x)|| / ||x||. Departures from KIVI
(also in ``analysis.departures``): every token is quantised (KIVI keeps the newest tokens
that do not fill a group in full precision; here a ragged last group is quantised as it is),
and per-token grouping uses one group over a token's whole head_dim (KIVI's code splits a
token's channels into groups of ``group``).
"""

from __future__ import annotations

import math

import polars as pl
import torch

from probes.trace import Trace

KINDS = ("key_pre_rope", "key", "value")


def channel_stats(trace: Trace, ratio: float = 4.0, top: int = 4) -> pl.DataFrame:
    """One row per (kind, layer, kv_head, channel) with magnitude, kurtosis and outlier flags."""
    parts = []
    for kind in KINDS:
        for layer in trace.layers:
            name = f"layers.{layer}.{kind}"
            if name not in trace.tensors:
                continue
            x = trace.tensors[name].float()  # [Hkv, T, D]
            hkv, _t, d = x.shape
            ax = x.abs()
            max_abs = ax.amax(1)
            mean_abs = ax.mean(1)
            centred = x - x.mean(1, keepdim=True)
            var = centred.pow(2).mean(1).clamp_min(1e-12)
            kurt = centred.pow(4).mean(1) / var.pow(2) - 3.0
            # the median of an even count is the mean of the two middle values (torch.median
            # would return the lower one)
            median = mean_abs.quantile(0.5, dim=-1, keepdim=True).clamp_min(1e-12)
            top_idx = ax.topk(min(top, d), dim=-1).indices  # [Hkv, T, top]
            in_top = torch.zeros_like(ax).scatter_(-1, top_idx, 1.0).mean(1)  # [Hkv, D]
            parts.append(
                pl.DataFrame(
                    {
                        "kind": [kind] * (hkv * d),
                        "layer": [layer] * (hkv * d),
                        "kv_head": torch.arange(hkv).repeat_interleave(d).tolist(),
                        "channel": torch.arange(d).repeat(hkv).tolist(),
                        "max_abs": max_abs.reshape(-1).tolist(),
                        "mean_abs": mean_abs.reshape(-1).tolist(),
                        "kurtosis": kurt.reshape(-1).tolist(),
                        "ratio_to_median": (mean_abs / median).reshape(-1).tolist(),
                        "top_fraction": in_top.reshape(-1).tolist(),
                    }
                )
            )
    if not parts:
        from probes.errors import KvlensError

        raise KvlensError("this trace has no keys or values; probe without --no-kv")
    df = pl.concat(parts).cast({"layer": pl.Int16, "kv_head": pl.Int16, "channel": pl.Int16})
    return df.with_columns(
        outlier=pl.col("ratio_to_median") >= ratio,
        persistent=(pl.col("ratio_to_median") >= ratio) & (pl.col("top_fraction") >= 0.5),
    )


def outlier_summary(stats: pl.DataFrame) -> pl.DataFrame:
    """Per kind and layer: how many outlier channels, how many persist, the largest ratio."""
    return (
        stats.group_by("kind", "layer")
        .agg(
            pl.col("outlier").sum().alias("outliers"),
            pl.col("persistent").sum().alias("persistent"),
            pl.col("ratio_to_median").max().alias("max_ratio"),
            pl.col("kurtosis").max().alias("max_kurtosis"),
        )
        .sort("kind", "layer")
    )


def hadamard(n: int, device=None) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix of size n (a power of two): H @ H.T = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def fake_quantize(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric uniform quantise-dequantise with min/max over ``dim`` (round to nearest)."""
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    levels = 2**bits - 1
    step = ((hi - lo) / levels).clamp_min(1e-12)
    return torch.round((x - lo) / step).clamp(0, levels) * step + lo


def grouped_error(x: torch.Tensor, bits: int, grouping: str, group: int = 32) -> torch.Tensor:
    """Relative error of quantising x [..., Hkv, T, D] per channel (groups of ``group``
    tokens) or per token; one value per leading index (per layer when x is stacked)."""
    if grouping == "per_token":
        q = fake_quantize(x, bits, dim=-1)
    elif grouping == "per_channel":
        *lead, t, d = x.shape
        pad = (-t) % group
        xp = torch.cat([x, x[..., -1:, :].expand(*lead, pad, d)], -2) if pad else x
        q = fake_quantize(xp.reshape(*lead, -1, group, d), bits, dim=-2).reshape(*lead, -1, d)[
            ..., :t, :
        ]
    else:
        raise ValueError("grouping must be per_token or per_channel")
    dims = (-3, -2, -1)
    return (x - q).pow(2).sum(dims).sqrt() / x.pow(2).sum(dims).sqrt().clamp_min(1e-12)


def quantization_error(
    trace: Trace, bits: tuple[int, ...] = (2, 4), group: int = 32
) -> pl.DataFrame:
    """Per kind and layer: error of per-channel vs per-token grouping, rotated or not."""
    rows = []
    for kind in KINDS:
        layers = [layer for layer in trace.layers if f"layers.{layer}.{kind}" in trace.tensors]
        if not layers:
            continue
        # one layer at a time: its temporaries stay in the CPU's caches (all layers stacked,
        # each elementwise pass allocated and walked ~100 MB on a 4.6k-token SmolLM2 trace)
        errors: dict[tuple, list[float]] = {}
        for layer in layers:
            x = trace.tensors[f"layers.{layer}.{kind}"].float()
            variants = {False: x, True: x @ hadamard(x.shape[-1], x.device)}
            for b in bits:
                for grouping in ("per_channel", "per_token"):
                    for rotated, data in variants.items():
                        err = float(grouped_error(data, b, grouping, group))
                        errors.setdefault((b, grouping, rotated), []).append(err)
        rows.extend(
            {
                "kind": kind,
                "layer": layer,
                "bits": b,
                "grouping": grouping,
                "rotated": rotated,
                "error": err,
            }
            for (b, grouping, rotated), values in errors.items()
            for layer, err in zip(layers, values, strict=True)
        )
    return pl.DataFrame(rows).cast({"layer": pl.Int16, "bits": pl.Int8})
