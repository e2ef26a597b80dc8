"""Retrieval, echo and induction heads.

Retrieval score (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality"): while the model copies a needle out of a haystack under greedy decoding, a
head "retrieves" at a step when the token that step's query produces is a needle token and
the head's strongest attention, from that query, points at a needle position holding that
very token (the query that *produces* the token, not the query of the token fed at that
step: that one would score echo heads, which attend to earlier copies of their own input
token). Its score is the fraction of the needle's tokens it retrieved, averaged over the
prompts given. kvlens reads the attention rows from the probe's generate mode (step s: the
query producing generated token s); the paper aggregates the same event.

Echo and induction scores (the measurement RazorAttention uses to find heads to protect,
after Olsson et al.'s induction heads): on a random token sequence repeated twice, the
attention each query of the second copy pays to the earlier occurrence of its own token
(echo) and to the token right after that occurrence (induction), averaged over queries.
"""

from __future__ import annotations

import polars as pl
import torch

from probes.trace import Trace


def retrieval_events(trace: Trace, needle_positions: list[int]) -> pl.DataFrame:
    """One row per (step, layer, head) where the head retrieved the token being produced.

    Step s's row is the attention of the query that produces generated token s (see
    ``probes.trace``): the event is that query's strongest attention landing on a needle
    position that holds the very token it produces. Ties go to the earliest position.
    """
    if trace.step_stats is None:
        from probes.errors import KvlensError

        raise KvlensError("retrieval scores need decoding steps; probe with generate > 0")
    needle = set(needle_positions)
    ids = trace.token_ids
    steps = trace.decode_steps()
    produced = dict(zip(steps["step"].to_list(), steps["produced"].to_list()))
    best = (
        trace.step_stats.sort(["attention", "position"], descending=[True, False])
        .group_by("step", "layer", "head", maintain_order=True)
        .first()
    )
    hits = [
        r
        for r in best.iter_rows(named=True)
        if r["position"] in needle and ids[r["position"]] == produced.get(r["step"])
    ]
    schema = {"step": pl.Int32, "layer": pl.Int16, "head": pl.Int16, "position": pl.Int32}
    return pl.DataFrame([{k: r[k] for k in schema} for r in hits], schema=schema)


def retrieval_scores(
    trace: Trace,
    needle_positions: list[int],
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> pl.DataFrame:
    """Per layer and head: fraction of needle tokens retrieved (0 for heads that never did)."""
    events = retrieval_events(trace, needle_positions)
    per_head = events.group_by("layer", "head").agg(pl.col("position").n_unique().alias("hits"))
    grid = _grid(n_layers or trace.model.n_layers, n_heads or trace.model.n_heads)
    return (
        grid.join(per_head, on=["layer", "head"], how="left")
        .with_columns((pl.col("hits").fill_null(0) / len(set(needle_positions))).alias("retrieval"))
        .select("layer", "head", "retrieval")
    )


def _grid(n_layers: int, n_heads: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "layer": [lay for lay in range(n_layers) for _ in range(n_heads)],
            "head": [h for _ in range(n_layers) for h in range(n_heads)],
        },
        schema={"layer": pl.Int16, "head": pl.Int16},
    )


def echo_induction_scores(trace: Trace, offset: int, period: int) -> pl.DataFrame:
    """Echo and induction score per layer and head, from full attention maps of a prompt
    whose tokens ``[offset, offset + period)`` repeat right after themselves."""
    rows = []
    queries = torch.arange(offset + period, offset + 2 * period)
    for layer in trace.layers:
        p = trace.attn(layer).float()  # [H, T, T]
        echo = p[:, queries, queries - period].mean(-1)
        induction = p[:, queries[:-1], queries[:-1] - period + 1].mean(-1)
        for h in range(p.shape[0]):
            rows.append(
                {
                    "layer": layer,
                    "head": h,
                    "echo": float(echo[h]),
                    "induction": float(induction[h]),
                }
            )
    return pl.DataFrame(rows).cast({"layer": pl.Int16, "head": pl.Int16})


def top_heads(scores: pl.DataFrame, column: str, k: int = 10) -> pl.DataFrame:
    return scores.sort(column, descending=True).head(k).select("layer", "head", column)
