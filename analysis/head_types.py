"""Head taxonomy: one row per head with the measures that separate head kinds, and a type.

The kinds follow the papers that found them: retrieval heads (Wu et al. 2024, scored by
``analysis.retrieval_heads``), attention-sink heads (StreamingLLM, Xiao et al. 2024), and
the local ("streaming") versus full-context heads that DuoAttention (Xiao et al. 2025) and
RazorAttention (Tang et al. 2025) compress differently. Departure (also in
``analysis.departures``): those papers pick heads by a learned gate (DuoAttention) or a top
share of echo/induction scores (RazorAttention); kvlens uses the fixed thresholds below.

Measures (from the probe's query statistics, queries past the sinks only): mean entropy (nats)
and entropy normalised by log(visible keys); mean attention distance; sink ratio (mass on the
first tokens); locality (mass on the 16 nearest positions); and, when given, the retrieval
score of ``analysis.retrieval_heads``.

Rule, checked in this order (first match wins), thresholds stated here and nowhere else:
  retrieval  retrieval score >= 0.1
  sink       sink ratio >= 0.5
  local      locality >= 0.5
  diffuse    normalised entropy >= 0.6
  mixed      otherwise
"""

from __future__ import annotations

import polars as pl

from probes.errors import KvlensError
from probes.trace import Trace

RULES = (
    ("retrieval", pl.col("retrieval") >= 0.1),
    ("sink", pl.col("sink_ratio") >= 0.5),
    ("local", pl.col("locality") >= 0.5),
    ("diffuse", pl.col("entropy_norm") >= 0.6),
)


def head_measures(trace: Trace, retrieval: pl.DataFrame | None = None) -> pl.DataFrame:
    q = trace.query_stats
    if q is None:
        raise KvlensError(
            "this trace has no query statistics; probe with --attention stats or full"
        )
    n_sinks = int(trace.settings.get("sinks", 4))
    df = (
        q.filter(pl.col("position") >= max(n_sinks, 1))
        .with_columns(
            entropy_norm=pl.col("entropy") / (pl.col("position") + 1).cast(pl.Float32).log()
        )
        .group_by("layer", "head")
        .agg(
            pl.col("entropy").mean(),
            pl.col("entropy_norm").mean(),
            pl.col("mean_distance").mean(),
            pl.col("sink_mass").mean().alias("sink_ratio"),
            pl.col("local_mass").mean().alias("locality"),
        )
        .sort("layer", "head")
    )
    if retrieval is not None:
        df = df.join(
            retrieval.select("layer", "head", "retrieval"), on=["layer", "head"], how="left"
        )
    else:
        df = df.with_columns(retrieval=pl.lit(None, dtype=pl.Float64))
    return df.with_columns(retrieval=pl.col("retrieval").fill_null(0.0))


def classify(measures: pl.DataFrame) -> pl.DataFrame:
    """Add a ``type`` column by the module's rule."""
    expr = pl.lit("mixed")
    for name, cond in reversed(RULES):
        expr = pl.when(cond).then(pl.lit(name)).otherwise(expr)
    return measures.with_columns(type=expr)


def head_types(trace: Trace, retrieval: pl.DataFrame | None = None) -> pl.DataFrame:
    return classify(head_measures(trace, retrieval))
