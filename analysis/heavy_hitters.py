"""Heavy hitters: which tokens soak up attention, per layer and head.

Reproduces the measurements behind H2O (accumulated attention; Zhang et al. 2023),
TOVA/Keyformer (attention concentrates on few tokens), Scissorhands' persistence of
importance (Liu et al. 2023) and StreamingLLM's attention sinks (Xiao et al. 2024).
Scores come from the exact statistics of one probe: ``received`` is H2O's accumulated score
(the attention each key receives, summed over every prompt query).

Departures (also in ``analysis.departures``): the views rank by ``received_norm`` by default,
which divides by the number of queries that can see a token, because causal masking alone
favours early tokens; ``by="received"`` gives H2O's ranking. Persistence uses the probe's
generate mode and reports the mean Jaccard overlap of the top-k sets of consecutive steps'
attention rows; Scissorhands instead measures the share of a history window's heavy tokens
that stay heavy afterwards. Sink mass averages over the queries past the sinks only.
"""

from __future__ import annotations

import polars as pl

from probes.trace import Trace

SCORES = ("received", "received_norm", "window")


def _require(trace: Trace, table: str) -> pl.DataFrame:
    df = getattr(trace, table)
    if df is None:
        from probes.errors import KvlensError

        raise KvlensError(f"this trace has no {table}; probe with --attention stats or full")
    return df


def token_scores(trace: Trace) -> pl.DataFrame:
    """Per layer, head and position: the three scores and the token text."""
    tokens = pl.DataFrame({"position": range(trace.n_tokens), "token": trace.tokens}).cast(
        {"position": pl.Int32}
    )
    return _require(trace, "key_stats").join(tokens, on="position", how="left")


def top_k(trace: Trace, k: int = 16, by: str = "received_norm") -> pl.DataFrame:
    """The k highest-scoring positions per layer and head, with rank (0 = heaviest)."""
    if by not in SCORES:
        raise ValueError(f"by must be one of {SCORES}")
    return (
        token_scores(trace)
        .sort(by, descending=True)
        .group_by("layer", "head", maintain_order=True)
        .head(k)
        .with_columns(rank=pl.int_range(pl.len()).over("layer", "head").cast(pl.Int32))
        .select("layer", "head", "kv_head", "rank", "position", "token", by)
        .sort("layer", "head", "rank")
    )


def model_top(trace: Trace, k: int = 10, by: str = "received_norm") -> pl.DataFrame:
    """Tokens ranked by their score averaged over every layer and head."""
    return (
        token_scores(trace)
        .group_by("position", "token")
        .agg(pl.col(by).mean().alias(by))
        .sort(by, descending=True)
        .head(k)
    )


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def head_overlap(trace: Trace, k: int = 16, by: str = "received_norm") -> pl.DataFrame:
    """Jaccard overlap of the top-k sets of every pair of heads within each layer."""
    sets = {
        (r["layer"], r["head"]): set(r["position"])
        for r in top_k(trace, k, by).group_by("layer", "head").agg("position").iter_rows(named=True)
    }
    rows = []
    for (layer, h1), s1 in sets.items():
        for (layer2, h2), s2 in sets.items():
            if layer2 == layer:
                rows.append(
                    {"layer": layer, "head_a": h1, "head_b": h2, "jaccard": _jaccard(s1, s2)}
                )
    return pl.DataFrame(rows).sort("layer", "head_a", "head_b")


def layer_overlap(trace: Trace, k: int = 16, by: str = "received_norm") -> pl.DataFrame:
    """Jaccard overlap between layers of the top-k sets of the layer-mean score."""
    per_layer = (
        token_scores(trace)
        .group_by("layer", "position")
        .agg(pl.col(by).mean())
        .sort(by, descending=True)
        .group_by("layer", maintain_order=True)
        .head(k)
    )
    sets = {
        r["layer"]: set(r["position"])
        for r in per_layer.group_by("layer").agg("position").iter_rows(named=True)
    }
    rows = [
        {"layer_a": a, "layer_b": b, "jaccard": _jaccard(sets[a], sets[b])}
        for a in sorted(sets)
        for b in sorted(sets)
    ]
    return pl.DataFrame(rows)


def sinks(trace: Trace) -> pl.DataFrame:
    """Per layer and head, the mean attention mass on the first ``sinks`` positions."""
    q = _require(trace, "query_stats")
    n_sinks = int(trace.settings.get("sinks", 4))
    return (
        q.filter(pl.col("position") >= n_sinks)  # the first queries can only see sinks
        .group_by("layer", "head")
        .agg(pl.col("sink_mass").mean().alias("sink_mass"))
        .sort("layer", "head")
        .with_columns(pl.lit(n_sinks).alias("n_sinks"))
    )


def persistence(trace: Trace, k: int = 16) -> pl.DataFrame:
    """Per layer and head: mean Jaccard of the top-k attended positions between consecutive
    decoding steps (only positions of the prompt are ranked, so sets are comparable)."""
    steps = trace.step_stats
    if steps is None:
        from probes.errors import KvlensError

        raise KvlensError("this trace has no decoding steps; probe with --generate N")
    n_prompt = trace.n_prompt_tokens
    # each (step, layer, head)'s top k by attention, without sorting the whole table
    top = (
        steps.filter(pl.col("position") < n_prompt)
        .group_by("step", "layer", "head")
        .agg(pl.col("position").top_k_by("attention", k))
        .sort("layer", "head", "step")
    )
    rows = []
    for (layer, head), part in top.group_by("layer", "head", maintain_order=True):
        sets = [set(p) for p in part["position"].to_list()]
        pairs = [_jaccard(a, b) for a, b in zip(sets, sets[1:])]
        if pairs:
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "persistence": sum(pairs) / len(pairs),
                    "steps": len(sets),
                }
            )
    return pl.DataFrame(rows).sort("layer", "head")
