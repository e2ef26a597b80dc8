"""Plotly figures from analysis tables: used by the app's pages and by saved reports alike.

Plotly renders a subset of HTML in titles, labels and hover text, so every string that can
come from a prompt, a token or a method spec passes through ``esc`` first.

Colours are explicit and the template is fixed (``plotly_white``), so a figure looks the same
in the app and in an exported report: inside a Streamlit process plotly's default template is
Streamlit's, whose colours are placeholders only Streamlit's front end resolves (near-black
anywhere else). One kept/evicted pair is used everywhere; magnitudes use sequential scales,
signed quantities (cosine) a diverging one.
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
import polars as pl

TEMPLATE = "plotly_white"
LAYOUT = {"margin": {"l": 60, "r": 20, "t": 50, "b": 50}, "height": 420}
KEPT = "#2166ac"  # blue: kept / selected tokens
EVICTED = "#e66101"  # orange: evicted tokens
OTHER = "#9e9e9e"  # grey: tokens that are neither
KEPT_BG = "#cfe2f3"  # light tints of the pair, behind token text
EVICTED_BG = "#fdd9b5"
SEQUENTIAL = "Viridis"  # magnitudes (entropy, mass, |x|, similarity in [0, 1])
PROBABILITY = "Blues"  # attention probabilities, white = 0
DIVERGING = "RdBu"  # signed values centred on 0
# categorical series (methods, groupings): Okabe-Ito, distinguishable with colour blindness;
# series 0 (the full cache) is the dark blue
PALETTE = [
    "#0072b2",
    "#e69f00",
    "#009e73",
    "#d55e00",
    "#cc79a7",
    "#56b4e9",
    "#f0e442",
    "#000000",
]


def esc(text: object) -> str:
    """Text shown by plotly, HTML-escaped (plotly shows the entities as the characters)."""
    return html.escape(str(text))


def colour(i: int) -> str:
    """The i-th categorical colour (the full cache is series 0)."""
    return PALETTE[i % len(PALETTE)]


def _title(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(title=esc(title), template=TEMPLATE, **LAYOUT)
    return fig


def layer_head_heatmap(
    df: pl.DataFrame,
    value: str,
    title: str,
    head_col: str = "head",
    clickable: bool = False,
    colorscale: str = SEQUENTIAL,
) -> go.Figure:
    """Layers on y, heads on x.

    With ``clickable``, an invisible marker sits on every cell: plotly cannot select heatmap
    cells, but it can select markers, so a click on a cell selects its (layer, head) through
    ``st.plotly_chart(..., on_select="rerun")`` (the point's x is the head, y the layer).
    """
    layers = sorted(df["layer"].unique().to_list())
    heads = sorted(df[head_col].unique().to_list())
    grid = {
        (r["layer"], r[head_col]): r[value]
        for r in df.select("layer", head_col, value).iter_rows(named=True)
    }
    z = [[grid.get((lay, h)) for h in heads] for lay in layers]
    hover = "layer %{y}, " + head_col.replace("_", " ") + " %{x}<br>" + value + " %{z:.3f}"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=heads,
            y=layers,
            colorscale=colorscale,
            colorbar={"title": {"text": esc(value)}},
            hoverinfo="skip" if clickable else None,
            hovertemplate=None if clickable else hover + "<extra></extra>",
        )
    )
    if clickable:
        xs = [h for _ in layers for h in heads]
        ys = [lay for lay in layers for _ in heads]
        fig.add_scatter(
            x=xs,
            y=ys,
            mode="markers",
            marker={"size": 12, "opacity": 0},
            selected={"marker": {"opacity": 0}},
            unselected={"marker": {"opacity": 0}},
            customdata=[grid.get((y, x)) for x, y in zip(xs, ys)],
            hovertemplate=hover.replace("%{z:.3f}", "%{customdata:.3f}") + "<extra></extra>",
            showlegend=False,
        )
        fig.update_layout(hovermode="closest", hoverdistance=-1, clickmode="event+select")
        # the markers must not widen the axes beyond the cells
        fig.update_xaxes(range=[min(heads) - 0.5, max(heads) + 0.5])
        fig.update_yaxes(range=[max(layers) + 0.5, min(layers) - 0.5])
    fig.update_xaxes(title=head_col.replace("_", " "), dtick=1, showgrid=False, zeroline=False)
    fig.update_yaxes(title="layer", showgrid=False, zeroline=False)
    if not clickable:
        fig.update_yaxes(autorange="reversed")
    return _title(fig, title)


def attention_map(probs, tokens: list[str], title: str) -> go.Figure:
    """One head's T x T attention probabilities, token text on hover."""
    labels = [esc(f"{i}: {t!r}") for i, t in enumerate(tokens)]
    small = len(tokens) <= 256
    fig = go.Figure(
        go.Heatmap(
            z=probs,
            x=list(range(len(tokens))),
            y=list(range(len(tokens))),
            customdata=[
                [(labels[q], labels[k]) for k in range(len(tokens))] for q in range(len(tokens))
            ]
            if small
            else None,
            colorscale=PROBABILITY,
            zmin=0,
            colorbar={"title": {"text": "p"}},
            hovertemplate=(
                "query %{customdata[0]}<br>key %{customdata[1]}<br>p %{z:.4f}<extra></extra>"
                if small
                else "query %{y}, key %{x}<br>p %{z:.4f}<extra></extra>"
            ),
        )
    )
    fig.update_xaxes(title="key position (attended to)")
    fig.update_yaxes(title="query position", autorange="reversed")
    return _title(fig, title)


def token_scores(
    positions: list[int],
    tokens: list[str],
    scores: list[float],
    title: str,
    highlight: set[int] | None = None,
    highlight_colour: str = KEPT,
    other_colour: str = OTHER,
    y_title: str = "score",
) -> go.Figure:
    """Bars per position (hover shows the token); highlighted positions in another colour."""
    colours = [
        highlight_colour if highlight and p in highlight else other_colour for p in positions
    ]
    fig = go.Figure(
        go.Bar(
            x=positions,
            y=scores,
            marker_color=colours,
            customdata=[esc(repr(tokens[p])) for p in positions],
            hovertemplate="position %{x}: %{customdata}<br>%{y:.4f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="token position")
    fig.update_yaxes(title=esc(y_title))
    return _title(fig, title)


def layer_layer(df: pl.DataFrame, value: str, title: str) -> go.Figure:
    """Layer x layer matrix; cosine can be negative (diverging), CKA/Jaccard cannot."""
    layers = sorted(df["layer_a"].unique().to_list())
    grid = {(r["layer_a"], r["layer_b"]): r[value] for r in df.iter_rows(named=True)}
    z = [[grid.get((a, b)) for b in layers] for a in layers]
    signed = value == "cosine"
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=layers,
            y=layers,
            colorscale=DIVERGING if signed else SEQUENTIAL,
            zmid=0 if signed else None,
            colorbar={"title": {"text": esc(value)}},
            hovertemplate="layers %{y} and %{x}<br>" + value + " %{z:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="layer")
    fig.update_yaxes(title="layer", autorange="reversed")
    return _title(fig, title)


def adjacent_curve(df: pl.DataFrame, value: str, title: str) -> go.Figure:
    adj = df.filter(pl.col("layer_b") == pl.col("layer_a") + 1).sort("layer_a")
    fig = go.Figure(
        go.Scatter(
            x=adj["layer_a"].to_list(),
            y=adj[value].to_list(),
            mode="lines+markers",
            line={"color": KEPT},
        )
    )
    fig.update_xaxes(title="layer l (compared with l+1)")
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
            colorscale=SEQUENTIAL,
            zmin=0,
            colorbar={"title": {"text": "mean |x|"}},
            hovertemplate="%{y}, channel %{x}<br>mean |x| %{z:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(title="channel")
    fig.update_yaxes(title="layer, KV head", autorange="reversed")
    fig = _title(fig, title)
    fig.update_layout(height=max(420, 12 * len(labels)))
    return fig


def quant_error_bars(q: pl.DataFrame, title: str) -> go.Figure:
    means = (
        q.group_by("kind", "bits", "grouping", "rotated")
        .agg(pl.col("error").mean())
        .sort("kind", "bits", "grouping", "rotated")
    )
    fig = go.Figure()
    groups = means.group_by("grouping", "rotated", maintain_order=True)
    for i, ((grouping, rotated), part) in enumerate(groups):
        fig.add_bar(
            name=f"{grouping}{' + Hadamard' if rotated else ''}",
            x=[f"{k} {b}-bit" for k, b in zip(part["kind"], part["bits"])],
            y=part["error"].to_list(),
            marker_color=colour(i + 1),
        )
    fig.update_xaxes(title="tensor and bit width")
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
                "colorscale": SEQUENTIAL,
                "size": 10 if heavy[0] else 5,
                "symbol": "diamond" if heavy[0] else "circle",
                "line": {"width": 1, "color": "black"} if heavy[0] else {"width": 0},
                "colorbar": {"title": {"text": "position"}} if not heavy[0] else None,
            },
            customdata=[esc(f"{p}: {t!r}") for p, t in zip(part["position"], part["token"])],
            hovertemplate="%{customdata}<extra></extra>",
        )
    fig.update_xaxes(title="UMAP 1")
    fig.update_yaxes(title="UMAP 2")
    fig.update_layout(legend={"orientation": "h", "y": -0.2})
    return _title(fig, title)


def kl_curves(results: list[dict], title: str) -> go.Figure:
    fig = go.Figure()
    for i, r in enumerate(results):
        fig.add_scatter(
            y=r["kl_per_step"],
            mode="lines+markers",
            name=esc(r["spec"]),
            line={"color": colour(i)},
            marker={"color": colour(i)},
        )
    fig.update_xaxes(title="generated token")
    fig.update_yaxes(title="KL(full || method)")
    fig = _title(fig, title)
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.25, "x": 0})
    fig.update_layout(margin={"b": 120})
    return fig


def memory_quality(results: list[dict], title: str) -> go.Figure:
    """One point per run, named in the legend (labels on the points overlap and clip)."""
    fig = go.Figure()
    for i, r in enumerate(results):
        fig.add_scatter(
            x=[100 * r["bytes_ratio"]],
            y=[r["kl_mean"]],
            mode="markers",
            name=esc(r["spec"]),
            marker={"color": colour(i), "size": 12},
            hovertemplate=esc(r["spec"])
            + "<br>%{x:.1f}% of full bytes<br>KL %{y:.4f}<extra></extra>",
        )
    fig.update_xaxes(title="bytes held, % of the full cache", rangemode="tozero")
    fig.update_yaxes(title="mean KL vs the full cache", rangemode="tozero")
    fig = _title(fig, title)
    fig.update_layout(legend={"orientation": "h", "yanchor": "top", "y": -0.25, "x": 0})
    fig.update_layout(margin={"b": 120})
    return fig


def kept_heatmap(result: dict, title: str) -> go.Figure:
    z = result["kept_per_layer"]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            colorscale=SEQUENTIAL,
            colorbar={"title": {"text": "kept"}},
            hovertemplate="layer %{y}, kv head %{x}<br>kept %{z} tokens<extra></extra>",
        )
    )
    fig.update_xaxes(title="KV head", dtick=1)
    fig.update_yaxes(title="layer", autorange="reversed")
    return _title(fig, title)


def leaderboard(board: pl.DataFrame, title: str) -> go.Figure:
    """Accuracy vs bytes held per method (the memory/quality frontier); the full cache as a line."""
    fig = go.Figure()
    families = board.filter(pl.col("method") != "full").group_by("family", maintain_order=True)
    for i, ((family,), part) in enumerate(families):
        fig.add_scatter(
            x=[100 * b for b in part["bytes_ratio"]],
            y=part["accuracy"].to_list(),
            mode="markers",
            name=esc(family),
            marker={"color": colour(i + 1), "size": 9},
            customdata=[esc(m) for m in part["method"]],
            hovertemplate="%{customdata}<br>%{x:.1f}% bytes<br>accuracy %{y:.2f}<extra></extra>",
        )
    full = board.filter(method="full")
    if full.height:
        fig.add_hline(
            y=float(full["accuracy"].mean()), line_dash="dash", annotation_text="full cache"
        )
    fig.update_xaxes(title="bytes held, % of the full cache")
    fig.update_yaxes(title="accuracy", range=[-0.05, 1.05])
    return _title(fig, title)


def latent_readiness(summaries: dict[str, pl.DataFrame], title: str) -> go.Figure:
    """Energy a joint latent of half the GQA cache width keeps, per layer, one line per
    series (e.g. pre-RoPE keys, post-RoPE keys, values); ranks for 90/99% in the hover."""
    fig = go.Figure()
    for i, (name, part) in enumerate(summaries.items()):
        part = part.sort("layer")
        fig.add_scatter(
            x=part["layer"].to_list(),
            y=part["energy_at_half"].to_list(),
            mode="lines+markers",
            name=esc(name),
            line={"color": colour(i)},
            customdata=list(zip(part["half_rank"], part["rank_90"], part["rank_99"])),
            hovertemplate=(
                "layer %{x}<br>energy at rank %{customdata[0]}: %{y:.4f}<br>"
                "rank for 90%: %{customdata[1]}, for 99%: %{customdata[2]}<extra></extra>"
            ),
        )
    fig.update_xaxes(title="layer")
    fig.update_yaxes(title="energy kept at half the width")
    fig.update_layout(legend={"orientation": "h", "y": -0.2})
    return _title(fig, title)
