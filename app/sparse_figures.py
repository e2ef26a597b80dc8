"""Figures of the sparse-attention view (``analysis.sparse_recall`` tables and the positions
each decoding step read), with the colours, escaping and template of ``app.figures``."""

from __future__ import annotations

import plotly.graph_objects as go
import polars as pl

from app.figures import KEPT, OTHER, _title, colour, esc


def method_name(spec: str) -> str:
    return spec.split(":", 1)[0]


def recall_vs_read(curve: pl.DataFrame, title: str) -> go.Figure:
    """Mean recall against mean tokens read, one line per method (its budgets as points),
    and the oracle's recall at each point's read (the ceiling), dashed."""
    fig = go.Figure()
    frame = curve.with_columns(
        pl.col("method").map_elements(method_name, return_dtype=pl.Utf8).alias("name")
    ).sort("tokens_read")
    for i, name in enumerate(sorted(frame["name"].unique().to_list())):
        part = frame.filter(name=name)
        specs = [esc(s) for s in part["method"].to_list()]
        fig.add_scatter(
            x=part["tokens_read"].to_list(),
            y=part["recall"].to_list(),
            mode="lines+markers",
            name=esc(name),
            line={"color": colour(i + 1)},
            customdata=specs,
            hovertemplate="%{customdata}<br>read %{x:.0f} tokens<br>recall %{y:.3f}<extra></extra>",
        )
    ceiling = frame.sort("tokens_read")
    fig.add_scatter(
        x=ceiling["tokens_read"].to_list(),
        y=ceiling["oracle_recall"].to_list(),
        mode="markers",
        name="oracle at the same read",
        marker={"symbol": "line-ew-open", "size": 14, "color": OTHER},
        hovertemplate="oracle: recall %{y:.3f} at %{x:.0f} tokens<extra></extra>",
    )
    fig.update_xaxes(title="tokens read per KV head and step (mean)", rangemode="tozero")
    fig.update_yaxes(title="attention recall (mass in the selection)", range=[0, 1.02])
    return _title(fig, title)


def step_recall(table: pl.DataFrame, title: str) -> go.Figure:
    """One head's recall and the oracle's at the same read, per decoding step."""
    part = table.sort("step")
    fig = go.Figure()
    fig.add_scatter(
        x=part["step"].to_list(), y=part["recall"].to_list(), mode="lines+markers",
        name="recall", line={"color": KEPT},
    )  # fmt: skip
    fig.add_scatter(
        x=part["step"].to_list(), y=part["oracle_recall"].to_list(), mode="lines",
        name="oracle at the same read", line={"color": OTHER, "dash": "dash"},
    )  # fmt: skip
    fig.update_xaxes(title="decoding step", dtick=1)
    fig.update_yaxes(title="attention recall", range=[0, 1.02])
    return _title(fig, title)


def read_strip(reads: pl.DataFrame, title: str) -> go.Figure:
    """Steps on y, positions on x: which positions one layer's KV head read at each step
    (the X-ray strip of a sparse method)."""
    part = reads.sort("step")
    steps = part["step"].to_list()
    held = int(part["n_held"].max())
    z = []
    for positions in part["positions"].to_list():
        row = [0] * held
        for p in positions:
            row[p] = 1
        z.append(row)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(held)),
            y=steps,
            colorscale=[[0, "#f4f4f4"], [1, KEPT]],
            zmin=0,
            zmax=1,
            showscale=False,
            hovertemplate="step %{y}, position %{x}<br>read %{z}<extra></extra>",
        )
    )
    fig.update_xaxes(title="position")
    fig.update_yaxes(title="decoding step", autorange="reversed", dtick=1)
    return _title(fig, title)
