"""Run every analysis a trace has data for, save the tables, and summarise them in text."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import polars as pl

from analysis import cross_layer, head_types, heavy_hitters, latent, outliers
from probes.trace import Trace


def analyze(
    trace: Trace,
    retrieval: pl.DataFrame | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, pl.DataFrame]:
    """Tables by name. Statistics-based tables need key/query stats; the rest need K/V."""
    jobs: list[tuple[str, Callable[[], pl.DataFrame]]] = []
    if trace.key_stats is not None:
        jobs += [
            ("heavy_hitters_top", lambda: heavy_hitters.top_k(trace, 16)),
            ("heavy_hitters_model", lambda: heavy_hitters.model_top(trace, 20)),
            ("heavy_hitters_head_overlap", lambda: heavy_hitters.head_overlap(trace, 16)),
            ("heavy_hitters_layer_overlap", lambda: heavy_hitters.layer_overlap(trace, 16)),
        ]
    if trace.query_stats is not None:
        jobs += [
            ("sinks", lambda: heavy_hitters.sinks(trace)),
            ("head_types", lambda: head_types.head_types(trace, retrieval)),
        ]
    if trace.step_stats is not None:
        jobs.append(("persistence", lambda: heavy_hitters.persistence(trace, 16)))
    if any(n.endswith(".key") for n in trace.tensors):
        jobs += [
            ("outlier_channels", lambda: outliers.channel_stats(trace)),
            ("quantization_error", lambda: outliers.quantization_error(trace)),
            ("similarity_key", lambda: cross_layer.pair_similarity(trace, "key")),
            ("similarity_value", lambda: cross_layer.pair_similarity(trace, "value")),
            ("cka_key", lambda: cross_layer.cka(trace, "key")),
            ("svd_energy_key", lambda: cross_layer.svd_energy(trace, "key")),
            ("latent_energy", lambda: latent.latent_energy(trace)),
            ("latent_readiness", lambda: latent.latent_summary(trace)),
        ]
    if retrieval is not None:
        jobs.append(("retrieval_heads", lambda: retrieval))
    tables = {}
    for name, job in jobs:
        if progress:
            progress(name)
        tables[name] = job()
    return tables


def save_tables(tables: dict[str, pl.DataFrame], folder: str | Path) -> Path:
    """Write each table as ``folder/analysis/NAME.parquet`` (each file written atomically)."""
    out = Path(folder) / "analysis"
    out.mkdir(exist_ok=True)
    for name, df in tables.items():
        tmp = out / f".{name}.{uuid.uuid4().hex[:8]}.parquet"
        df.write_parquet(tmp)
        os.replace(tmp, out / f"{name}.parquet")
    return out


def summarize(trace: Trace, tables: dict[str, pl.DataFrame]) -> str:
    """A short plain-text summary of the headline numbers of each table."""
    layers = trace.layers
    lines = [f"{trace.model.model_id}: {trace.n_tokens} tokens, layers {layers[0]}..{layers[-1]}"]
    if "heavy_hitters_model" in tables and tables["heavy_hitters_model"].height:
        top = tables["heavy_hitters_model"].head(5)
        items = ", ".join(
            f"{r['token']!r}@{r['position']} {r['received_norm']:.3f}"
            for r in top.iter_rows(named=True)
        )
        lines.append(f"top heavy hitters (received_norm, mean over heads): {items}")
    if "sinks" in tables and tables["sinks"].height:
        s = tables["sinks"]
        lines.append(
            f"sink mass: mean {s['sink_mass'].mean():.3f}, heads >= 0.5: "
            f"{(s['sink_mass'] >= 0.5).sum()} of {s.height}"
        )
    if "retrieval_heads" in tables:
        top = tables["retrieval_heads"].sort("retrieval", descending=True).head(5)
        items = ", ".join(
            f"L{r['layer']}H{r['head']} {r['retrieval']:.2f}" for r in top.iter_rows(named=True)
        )
        lines.append(f"top retrieval heads: {items}")
    if "outlier_channels" in tables:
        summary = outliers.outlier_summary(tables["outlier_channels"])
        for kind in outliers.KINDS:
            part = summary.filter(kind=kind)
            if part.height:
                per_layer = " ".join(str(v) for v in part["outliers"].to_list())
                lines.append(f"outlier channels per layer ({kind}): {per_layer}")
    if "quantization_error" in tables:
        q = tables["quantization_error"].filter(kind="key", bits=2)
        if q.height:
            means = (
                q.group_by("grouping", "rotated")
                .agg(pl.col("error").mean())
                .sort("grouping", "rotated")
            )
            items = ", ".join(
                f"{r['grouping']}{' rotated' if r['rotated'] else ''} {r['error']:.3f}"
                for r in means.iter_rows(named=True)
            )
            lines.append(f"2-bit key quantisation error: {items}")
    if "similarity_key" in tables:
        adj = tables["similarity_key"].filter(pl.col("layer_b") == pl.col("layer_a") + 1)
        top = adj.sort("cosine", descending=True).head(3)
        items = ", ".join(
            f"{r['layer_a']}-{r['layer_b']} {r['cosine']:.3f}" for r in top.iter_rows(named=True)
        )
        lines.append(f"most similar adjacent layers (key cosine): {items}")
    if "latent_readiness" in tables:
        ready = tables["latent_readiness"]
        items = ", ".join(
            f"{part['source'][0]} {part['energy_at_half'].mean():.3f} "
            f"(rank for 99%: {part['rank_99'].min()}..{part['rank_99'].max()})"
            for _, part in ready.group_by("kind", maintain_order=True)
        )
        lines.append(
            f"joint latent of rank {ready['half_rank'][0]} of {ready['width'][0]} "
            f"(TransMLA), mean energy kept: {items}"
        )
    if "head_types" in tables and tables["head_types"].height:
        counts = tables["head_types"].group_by("type").len().sort("len", descending=True)
        lines.append(
            "head types: "
            + ", ".join(f"{r['type']} {r['len']}" for r in counts.iter_rows(named=True))
        )
    return "\n".join(lines)
