"""Figures of the chunk-reuse view (CacheBlend, Yao et al. 2025; Cache-Craft, Agarwal et al.
2025; KVCOMM, Ye et al. 2025): quality against the recomputed share, deviation from the full
prefill per layer and position (``analysis.chunk_reuse`` tables), and the prompt coloured by
deviation with the recomputed tokens outlined. Colours, escaping and template of
``app.figures``; the prompt view is HTML whose every token is escaped."""

from __future__ import annotations

import html

import plotly.graph_objects as go
import polars as pl

from app.figures import KEPT, SEQUENTIAL, _title, colour, esc

QUALITY = {
    "kl_mean": "teacher-forced KL(full || method)",
    "accuracy": "answer accuracy",
    "top1": "top-1 agreement with the full prefill",
}


def method_name(spec: str) -> str:
    return spec.split(":", 1)[0]


def quality_curve(results: list[dict], value: str, title: str) -> go.Figure:
    """``value`` against the share of chunk tokens recomputed, one line per method (its
    recompute fractions as points); the full prefill sits at 100%, naive reuse at 0%."""
    fig = go.Figure()
    names = list(dict.fromkeys(method_name(r["spec"]) for r in results))
    for i, name in enumerate(names):
        part = sorted(
            (r for r in results if method_name(r["spec"]) == name), key=lambda r: r["recomputed"]
        )
        fig.add_scatter(
            x=[100 * r["recomputed"] for r in part],
            y=[r[value] for r in part],
            mode="lines+markers",
            name=esc(name),
            line={"color": colour(i)},
            customdata=[[esc(r["spec"]), 100 * r["flops_saved"]] for r in part],
            hovertemplate="%{customdata[0]}<br>recomputed %{x:.1f}%<br>"
            "FLOPs saved %{customdata[1]:.1f}%<br>%{y:.4f}<extra></extra>",
        )
    fig.update_xaxes(title="chunk tokens recomputed (%)", range=[-3, 103])
    fig.update_yaxes(title=esc(QUALITY.get(value, value)), rangemode="tozero")
    return _title(fig, title)


def deviation_heatmap(
    kv: pl.DataFrame, column: str, title: str, chunk_starts: list[int] | None = None
) -> go.Figure:
    """Layer x position heatmap of one deviation column; dotted lines where chunks start."""
    frame = kv.sort("layer", "position")
    layers = sorted(frame["layer"].unique().to_list())
    n = int(frame["position"].max()) + 1
    z = [frame.filter(layer=layer).sort("position")[column].to_list() for layer in layers]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n)),
            y=layers,
            colorscale=SEQUENTIAL,
            colorbar={"title": esc(column)},
            hovertemplate="layer %{y}, position %{x}<br>%{z:.4f}<extra></extra>",
        )
    )
    for start in chunk_starts or []:
        fig.add_vline(x=start - 0.5, line={"color": "white", "dash": "dot", "width": 1})
    fig.update_xaxes(title="prompt position (dotted: a chunk starts)")
    fig.update_yaxes(title="layer")
    return _title(fig, title)


def layer_deviation(summary: pl.DataFrame, title: str) -> go.Figure:
    """Per layer: mean relative key and value deviation over chunk tokens and, where present,
    the total variation distance of the question's attention."""
    fig = go.Figure()
    columns = [c for c in ("key_rel", "value_rel", "attention_tv") if c in summary.columns]
    for i, column in enumerate(columns):
        fig.add_scatter(
            x=summary["layer"].to_list(),
            y=summary[column].to_list(),
            mode="lines+markers",
            name=esc(column),
            line={"color": colour(i + 1)},
        )
    fig.update_xaxes(title="layer")
    fig.update_yaxes(title="deviation from the full prefill", rangemode="tozero")
    return _title(fig, title)


def _tint(x: float) -> str:
    """White (0) to a saturated orange (1)."""
    x = min(1.0, max(0.0, x))
    r, g, b = 255, round(255 - 150 * x), round(255 - 230 * x)
    return f"rgb({r},{g},{b})"


def prompt_html(
    tokens: list[str],
    scores: list[float],
    segments: list[int],
    selected: set[int] | None = None,
) -> str:
    """The prompt's tokens on a background by ``scores`` (scaled to the largest), recomputed
    positions outlined, a line break before each chunk; every token HTML-escaped."""
    top = max((s for s in scores if s == s), default=0.0) or 1.0
    parts, prev = [], None
    for p, tok in enumerate(tokens):
        seg = segments[p] if p < len(segments) else -2
        if prev is not None and seg != prev:
            parts.append("<br/>")
        prev = seg
        score = scores[p] if p < len(scores) else 0.0
        border = f"outline:2px solid {KEPT};" if selected and p in selected else ""
        text = html.escape(tok).replace("\n", "⏎")
        parts.append(
            f'<span title="position {p}: {score:.4f}" style="background:{_tint(score / top)};'
            f'{border}white-space:pre;font-family:monospace">{text}</span>'
        )
    return '<div style="line-height:1.9">' + "".join(parts) + "</div>"
