"""Head profiles: one table per model with every head's retrieval, echo, induction, sink ratio,
locality, entropy and type, and the comparison of two such tables.

Models differ in depth, so comparisons bin layers by relative depth (layer / (layers - 1)) into
``bins`` equal slices and compare the share of each head type and the mean of each measure.
The measures and types are those of ``analysis.head_types`` and the scores those of
``analysis.retrieval_heads`` (Wu et al. 2024; RazorAttention's echo and induction, after
Olsson et al. 2022); the binning by relative depth is kvlens's own convention.
"""

from __future__ import annotations

import polars as pl

from analysis.head_types import classify, head_measures
from probes.errors import KvlensError
from probes.trace import Trace

PROFILE_COLUMNS = (
    "model",
    "layer",
    "head",
    "depth",
    "retrieval",
    "echo",
    "induction",
    "sink_ratio",
    "locality",
    "entropy",
    "entropy_norm",
    "mean_distance",
    "type",
)
MEASURES = ("retrieval", "echo", "induction", "sink_ratio", "locality", "entropy_norm")


def build_profile(trace: Trace, scores: pl.DataFrame) -> pl.DataFrame:
    """A model's profile from a statistics trace and retrieval/echo/induction scores."""
    measures = head_measures(trace, scores.select("layer", "head", "retrieval"))
    profile = classify(measures).join(
        scores.select("layer", "head", "echo", "induction"), on=["layer", "head"], how="left"
    )
    n_layers = trace.model.n_layers
    return profile.with_columns(
        model=pl.lit(trace.model.model_id),
        depth=(pl.col("layer").cast(pl.Float64) / max(1, n_layers - 1)),
    ).select(PROFILE_COLUMNS)


def read_profile(path) -> pl.DataFrame:
    try:
        df = pl.read_parquet(path)
    except Exception as exc:
        raise KvlensError(f"{path}: not a readable profile ({exc.__class__.__name__})") from None
    missing = [c for c in PROFILE_COLUMNS if c not in df.columns]
    if missing:
        raise KvlensError(f"{path}: not a kvlens head profile (missing {', '.join(missing)})")
    return df


def type_shares(profile: pl.DataFrame) -> pl.DataFrame:
    """Share of each head type per model."""
    return (
        profile.group_by("model", "type")
        .len()
        .with_columns(share=pl.col("len") / pl.col("len").sum().over("model"))
        .sort("model", "type")
    )


def compare_profiles(a: pl.DataFrame, b: pl.DataFrame, bins: int = 5) -> pl.DataFrame:
    """Mean of each measure per relative-depth bin, for both models side by side."""
    both = pl.concat([a.select(PROFILE_COLUMNS), b.select(PROFILE_COLUMNS)], how="vertical_relaxed")
    if a["model"][0] == b["model"][0]:
        both = both.with_columns(
            model=pl.Series([f"{m} (a)" for m in a["model"]] + [f"{m} (b)" for m in b["model"]])
        )
    binned = both.with_columns(
        depth_bin=(pl.col("depth") * bins).floor().clip(0, bins - 1).cast(pl.Int8)
    )
    return (
        binned.group_by("model", "depth_bin")
        .agg([pl.col(m).mean() for m in MEASURES])
        .sort("model", "depth_bin")
    )
