"""Attention recall of sparse attention: how much of a step's true attention a selection holds.

For sparse-attention / KV-retrieval methods (Quest, Tang et al. 2024; ShadowKV, Sun et al.
2024; Squeezed Attention, Hooper et al. 2024) each decoding step of each KV head reads a set
S of the stored rows. Per query head of that KV head, with p the step's exact softmax over
every stored row and o = p V the full output:
  recall         sum_{i in S} p_i, the fraction of the attention mass the selection holds;
  oracle_recall  the mass of the query head's own |S| largest p_i: the ceiling of any
                 selection of that size (a KV head's shared selection cannot beat it);
  output_error   ||o_S - o|| / ||o||, o_S the exact attention over S alone (what the
                 method computes).
Inputs are tensors (queries, the keys and values held at the step, the rows read), so this
module never runs a model; ``methods.sparse.run`` gathers them from a run.

Tables (polars, one row per method, layer, query head and step): ``recall_table``; then
``recall_curve`` (recall against tokens read per method, with the oracle at the same reads),
``head_recall`` (the layer x head heatmap) and ``hard_heads`` (heads that stay below a recall
threshold at every budget tried, joined to the head taxonomy when given).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl
import torch

from probes.errors import KvlensError


@dataclass
class SelectedStep:
    """One KV head's decoding step: its group's queries [G, D] (query heads
    ``first_head``..), the keys and values it held [L, D], and the rows it read [n]."""

    method: str
    layer: int
    kv_head: int
    step: int
    first_head: int
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor
    scale: float


def step_recall(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, scale: float
) -> dict[str, torch.Tensor]:
    """Per query head [G]: recall, oracle_recall and output_error of reading ``rows``."""
    if keys.shape[0] == 0:
        raise KvlensError("a step with no stored keys has no attention to recall")
    logits = query.float() @ keys.float().T * scale  # [G, L]
    p = torch.softmax(logits, dim=-1)
    chosen = torch.zeros(keys.shape[0], dtype=torch.bool)
    chosen[rows.long().cpu()] = True
    chosen = chosen.to(p.device)
    recall = p[:, chosen].sum(-1)
    n = int(chosen.sum())
    oracle = p.topk(n, dim=-1).values.sum(-1) if n else torch.zeros_like(recall)
    full = p @ values.float()
    if n:
        sparse = torch.softmax(logits[:, chosen], dim=-1) @ values.float()[chosen]
    else:
        sparse = torch.zeros_like(full)
    err = (sparse - full).norm(dim=-1) / full.norm(dim=-1).clamp(min=1e-12)
    return {"recall": recall, "oracle_recall": oracle, "output_error": err}


SCHEMA = {
    "method": pl.Utf8,
    "layer": pl.Int16,
    "head": pl.Int16,
    "kv_head": pl.Int16,
    "step": pl.Int32,
    "n_read": pl.Int32,
    "n_held": pl.Int32,
    "recall": pl.Float64,
    "oracle_recall": pl.Float64,
    "output_error": pl.Float64,
}


def recall_table(steps: Iterable[SelectedStep]) -> pl.DataFrame:
    """One row per (method, layer, query head, step); columns in ``SCHEMA``."""
    cols: dict[str, list] = {name: [] for name in SCHEMA}
    for s in steps:
        got = step_recall(s.query, s.keys, s.values, s.rows, s.scale)
        for g in range(s.query.shape[0]):
            cols["method"].append(s.method)
            cols["layer"].append(s.layer)
            cols["head"].append(s.first_head + g)
            cols["kv_head"].append(s.kv_head)
            cols["step"].append(s.step)
            cols["n_read"].append(int(s.rows.numel()))
            cols["n_held"].append(int(s.keys.shape[0]))
            for name in ("recall", "oracle_recall", "output_error"):
                cols[name].append(float(got[name][g]))
    return pl.DataFrame(cols, schema=SCHEMA)


def recall_curve(table: pl.DataFrame) -> pl.DataFrame:
    """Per method: mean tokens read (and their share of those held), mean recall, the
    oracle's mean recall at the same reads, the worst head-step recall, mean output error."""
    _check(table)
    return (
        table.group_by("method")
        .agg(
            pl.col("n_read").mean().alias("tokens_read"),
            (pl.col("n_read") / pl.col("n_held")).mean().alias("read_fraction"),
            pl.col("recall").mean(),
            pl.col("oracle_recall").mean(),
            pl.col("recall").min().alias("min_recall"),
            pl.col("output_error").mean(),
        )
        .sort("tokens_read", "method")
    )


def head_recall(table: pl.DataFrame, method: str | None = None) -> pl.DataFrame:
    """Per (method, layer, head): mean recall over the steps, its minimum, the oracle's mean."""
    _check(table)
    if method is not None:
        table = table.filter(method=method)
    return (
        table.group_by("method", "layer", "head")
        .agg(
            pl.col("recall").mean(),
            pl.col("recall").min().alias("min_recall"),
            pl.col("oracle_recall").mean(),
            pl.col("output_error").mean(),
        )
        .sort("method", "layer", "head")
    )


def hard_heads(
    table: pl.DataFrame, threshold: float = 0.9, types: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Heads whose mean recall stays below ``threshold`` under every method (and budget) in
    ``table``: best_recall is their best method's mean, best_method names it. With ``types``
    (``analysis.head_types``: layer, head, type) each head's kind is joined on."""
    per = head_recall(table)
    best = (
        per.sort("recall", descending=True)
        .group_by("layer", "head", maintain_order=True)
        .agg(
            pl.col("recall").first().alias("best_recall"),
            pl.col("method").first().alias("best_method"),
            pl.col("oracle_recall").max().alias("oracle_recall"),
        )
        .filter(pl.col("best_recall") < threshold)
        .sort("best_recall")
    )
    if types is not None:
        best = best.join(
            types.select(pl.col("layer").cast(pl.Int16), pl.col("head").cast(pl.Int16), "type"),
            on=["layer", "head"],
            how="left",
        )
    return best


def _check(table: pl.DataFrame) -> None:
    if table.is_empty():
        raise KvlensError("no decoding steps selected: run a sparse method with new tokens")
