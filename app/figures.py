"""Plotly figures from analysis tables: used by the app's pages and by saved reports alike.

Plotly renders a subset of HTML in titles, labels and hover text, so every string that can
come from a prompt, a token or a method spec passes through ``esc`` first.
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
import polars as pl

LAYOUT = {"margin": {"l": 50, "r": 20, "t": 50, "b": 40}, "height": 420}


def esc(text: object) -> str:
    """Text shown by plotly, HTML-escaped (plotly shows the entities as the characters)."""
    return html.escape(str(text))


def _title(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(title=esc(title), **LAYOUT)
    return fig


def layer_head_heatmap(
    df: pl.DataFrame, value: str, title: str, head_col: str = "head"
) -> go.Figure:
    """Layers on y, heads on x; clicking a cell selects (layer, head) in the app."""
    layers = sorted(df["layer"].unique().to_list())
    heads = sorted(df[head_col].unique().to_list())
    grid = {
        (r["layer"], r[head_col]): r[value]
        for r in df.select("layer", head_col, value).iter_rows(named=True)
    }
    z = [[grid.get((lay, h)) for h in heads] for lay in layers]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=heads,
            y=layers,
            colorscale="Viridis",
            hovertemplate="layer %{y}, head %{x}<br>" + value + " %{z:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="head")
    fig.update_yaxes(title="layer", autorange="reversed")
    return _title(fig, title)


def attention_map(probs, tokens: list[str], title: str) -> go.Figure:
    """One head's T x T attention probabilities, token text on hover."""
    labels = [esc(f"{i}: {t!r}") for i, t in enumerate(tokens)]
    fig = go.Figure(
        go.Heatmap(
            z=probs,
            x=list(range(len(tokens))),
            y=list(range(len(tokens))),
            customdata=[
                [(labels[q], labels[k]) for k in range(len(tokens))] for q in range(len(tokens))
            ]
            if len(tokens) <= 256
            else None,
            colorscale="Blues",
            zmin=0,
            hovertemplate=(
                "query %{customdata[0]}<br>key %{customdata[1]}<br>p %{z:.4f}<extra></extra>"
                if len(tokens) <= 256
                else "query %{y}, key %{x}<br>p %{z:.4f}<extra></extra>"
            ),
        )
    )
    fig.update_xaxes(title="key position")
    fig.update_yaxes(title="query position", autorange="reversed")
    return _title(fig, title)


def token_scores(
    positions: list[int],
    tokens: list[str],
    scores: list[float],
    title: str,
    highlight: set[int] | None = None,
) -> go.Figure:
    """Bars per position (hover shows the token); highlighted positions in another colour."""
    colours = ["#d62728" if highlight and p in highlight else "#1f77b4" for p in positions]
    fig = go.Figure(
        go.Bar(
            x=positions,
            y=scores,
            marker_color=colours,
            customdata=[esc(repr(tokens[p])) for p in positions],
            hovertemplate="position %{x}: %{customdata}<br>%{y:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="position")
    return _title(fig, title)


def layer_layer(df: pl.DataFrame, value: str, title: str) -> go.Figure:
    layers = sorted(df["layer_a"].unique().to_list())
    grid = {(r["layer_a"], r["layer_b"]): r[value] for r in df.iter_rows(named=True)}
    z = [[grid.get((a, b)) for b in layers] for a in layers]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=layers,
            y=layers,
            colorscale="RdBu",
            zmid=0 if value == "cosine" else None,
            hovertemplate="layers %{y} and %{x}<br>" + value + " %{z:.3f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    return _title(fig, title)


def adjacent_curve(df: pl.DataFrame, value: str, title: str) -> go.Figure:
    adj = df.filter(pl.col("layer_b") == pl.col("layer_a") + 1).sort("layer_a")
    fig = go.Figure(
        go.Scatter(x=adj["layer_a"].to_list(), y=adj[value].to_list(), mode="lines+markers")
    )
    fig.update_xaxes(title="layer l (vs l+1)")
    fig.update_yaxes(title=value)
    return _title(fig, title)


def channel_heatmap(stats: pl.DataFrame, kind: str, title: str) -> go.Figure:
    """Mean |x| per (layer, kv_head) row and channel column."""
    part = stats.filter(kind=kind).sort("layer", "kv_head", "channel")
    rows = part.select("layer", "kv_head").unique(maintain_order=True)
    labels = [f"L{r['layer']} kv{r['kv_head']}" for r in rows.iter_rows(named=True)]
    n_ch = part["channel"].n_unique()
    z = part["mean_abs"].to_numpy().reshape(len(labels), n_ch)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_ch)),
            y=labels,
            colorscale="Magma",
            hovertemplate="%{y}, channel %{x}<br>mean |x| %{z:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="channel")
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=max(420, 12 * len(labels)))
    return _title(fig, title)


def quant_error_bars(q: pl.DataFrame, title: str) -> go.Figure:
    means = (
        q.group_by("kind", "bits", "grouping", "rotated")
        .agg(pl.col("error").mean())
        .sort("kind", "bits", "grouping", "rotated")
    )
    fig = go.Figure()
    for (grouping, rotated), part in means.group_by("grouping", "rotated", maintain_order=True):
        fig.add_bar(
            name=f"{grouping}{' + Hadamard' if rotated else ''}",
            x=[f"{k} {b}-bit" for k, b in zip(part["kind"], part["bits"])],
            y=part["error"].to_list(),
        )
    fig.update_yaxes(title="relative error")
    fig.update_layout(barmode="group")
    return _title(fig, title)


def umap_scatter(df: pl.DataFrame, title: str) -> go.Figure:
    fig = go.Figure()
    for heavy, part in df.group_by("heavy", maintain_order=True):
        fig.add_scatter(
            x=part["x"].to_list(),
            y=part["y"].to_list(),
            mode="markers",
            name="heavy hitter" if heavy[0] else "other",
            marker={
                "color": part["position"].to_list(),
                "colorscale": "Viridis",
                "size": 9 if heavy[0] else 5,
                "symbol": "diamond" if heavy[0] else "circle",
            },
            customdata=[esc(f"{p}: {t!r}") for p, t in zip(part["position"], part["token"])],
            hovertemplate="%{customdata}<extra></extra>",
        )
    return _title(fig, title)


def kl_curves(results: list[dict], title: str) -> go.Figure:
    fig = go.Figure()
    for r in results:
        fig.add_scatter(y=r["kl_per_step"], mode="lines+markers", name=esc(r["spec"]))
    fig.update_xaxes(title="generated token")
    fig.update_yaxes(title="KL(full || method)")
    return _title(fig, title)


def memory_quality(results: list[dict], title: str) -> go.Figure:
    fig = go.Figure(
        go.Scatter(
            x=[100 * r["bytes_ratio"] for r in results],
            y=[r["kl_mean"] for r in results],
            mode="markers+text",
            text=[esc(r["spec"].split(":")[0]) for r in results],
            textposition="top center",
            customdata=[esc(r["spec"]) for r in results],
            hovertemplate="%{customdata}<br>%{x:.1f}% of full bytes<br>KL %{y:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="bytes held, % of full cache")
    fig.update_yaxes(title="mean KL vs full")
    return _title(fig, title)


def kept_heatmap(result: dict, title: str) -> go.Figure:
    z = result["kept_per_layer"]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            colorscale="Greens",
            hovertemplate="layer %{y}, kv head %{x}<br>kept %{z} tokens<extra></extra>",
        )
    )
    fig.update_xaxes(title="KV head")
    fig.update_yaxes(title="layer", autorange="reversed")
    return _title(fig, title)


def leaderboard(board: pl.DataFrame, title: str) -> go.Figure:
    """Accuracy vs bytes held per method (the memory/quality frontier); the full cache as a line."""
    fig = go.Figure()
    for (family,), part in board.filter(pl.col("method") != "full").group_by(
        "family", maintain_order=True
    ):
        fig.add_scatter(
            x=[100 * b for b in part["bytes_ratio"]],
            y=part["accuracy"].to_list(),
            mode="markers",
            name=esc(family),
            customdata=[esc(m) for m in part["method"]],
            hovertemplate="%{customdata}<br>%{x:.1f}% bytes<br>accuracy %{y:.2f}<extra></extra>",
        )
    full = board.filter(method="full")
    if full.height:
        fig.add_hline(
            y=float(full["accuracy"].mean()), line_dash="dash", annotation_text="full cache"
        )
    fig.update_xaxes(title="bytes held, % of full cache")
    fig.update_yaxes(title="accuracy", range=[-0.05, 1.05])
    return _title(fig, title)
