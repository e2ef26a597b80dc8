"""Self-contained HTML reports: the prompt, model facts, every analysis figure and table, and
a comparison of methods. plotly.js is embedded once, so the file opens offline. Every piece
of text that came from a prompt, a token or a generated output is HTML-escaped (plotly's own
JSON escapes '<', '>' and '/' inside figures)."""

from __future__ import annotations

import html
import time
from collections.abc import Callable

import plotly.graph_objects as go
import polars as pl
from plotly.offline import get_plotlyjs

from analysis import heavy_hitters, outliers
from analysis.run_all import analyze, summarize
from app import figures
from probes.trace import Trace

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
pre.prompt { white-space: pre-wrap; background: #f6f6f6; padding: 1rem;
             max-height: 24rem; overflow: auto; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1.5rem; }
td, th { border: 1px solid #ddd; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
p.caption { color: #555; font-size: 0.85rem; margin: 0 0 1.5rem; }
"""


def _table(df: pl.DataFrame | list[dict], max_rows: int = 30) -> str:
    rows = df.head(max_rows).to_dicts() if isinstance(df, pl.DataFrame) else list(df)[:max_rows]
    if not rows:
        return "<p><i>(empty)</i></p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    body = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


CAPTIONS = {
    "received": "Attention each token receives, mean over heads: tall bars are the heavy "
    "hitters H2O (Zhang et al., 2023) keeps.",
    "sinks": "Share of each head's attention on the first tokens: attention sinks (Xiao et al., "
    "2023, StreamingLLM).",
    "overlap": "How much two layers agree on their top tokens (Jaccard; 1 = the same set).",
    "persistence": "Share of a head's top tokens that stay on top from one generated token to "
    "the next (Scissorhands, Liu et al., 2023).",
    "retrieval": "How often a head's strongest attention lands on the needle token being copied "
    "(retrieval heads, Wu et al., 2024).",
    "channels": "Mean |x| per channel; bright columns across rows are outlier channels, why KIVI "
    "and KVQuant quantise keys per channel.",
    "quant": "Relative error after quantising, by grouping and bit width, with and without a "
    "Hadamard rotation (QuaRot, RotateKV); lower is better.",
    "cosine": "Mean per-token cosine between layers (blue alike, red opposite); MiniCache merges "
    "adjacent layers where it is high.",
    "cka": "Linear CKA between layers (Kornblith et al., 2019): 1 = the same information up to "
    "rotation and scale.",
    "kl": "KL of each method's next-token distribution from the full cache's at each generated "
    "token, both fed the full cache's tokens (0 = identical).",
    "memory": "One point per run: left holds fewer bytes (as a 16-bit server holds them), lower "
    "is closer to the full cache.",
    "leaderboard": "Accuracy vs bytes held per method; the dashed line is the full cache.",
}


def _figure(fig: go.Figure, caption: str = "") -> str:
    """A figure (plotly.js is embedded once in the page head) and its one-line reading."""
    html_fig = fig.to_html(full_html=False, include_plotlyjs=False)
    text = CAPTIONS.get(caption, "")
    return html_fig + (f'<p class="caption">{html.escape(text)}</p>' if text else "")


def build_report(
    trace: Trace,
    comparison: dict | None = None,
    retrieval: pl.DataFrame | None = None,
    sweep: pl.DataFrame | None = None,
    sparse: dict | None = None,
    reuse: dict | None = None,
    progress: Callable[[str], None] | None = None,
) -> str:
    """The report as one HTML string; ``sparse`` and ``reuse`` are the Sparse attention and
    Chunk reuse pages' last results (their jobs' dicts), shown when given; ``progress`` is
    told the name of each analysis before it runs."""
    tables = analyze(trace, retrieval, progress)
    parts: list[str] = []
    m = trace.model
    parts.append("<h1>kvlens report</h1>")
    parts.append(f"<p>Created {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>")
    parts.append(
        "<h2>Model</h2>"
        + _table(
            [
                {
                    "model": m.model_id,
                    "layers": m.n_layers,
                    "heads": m.n_heads,
                    "KV heads": m.n_kv_heads,
                    "head_dim": m.head_dim,
                    "RoPE theta": m.rope_theta,
                    "tokens": trace.n_tokens,
                    "attention": trace.settings.get("attention"),
                }
            ]
        )
    )
    parts.append(f'<h2>Prompt</h2><pre class="prompt">{html.escape(trace.prompt)}</pre>')
    parts.append(f"<h2>Summary</h2><pre>{html.escape(summarize(trace, tables))}</pre>")
    if "heavy_hitters_model" in tables:
        parts.append("<h2>Heavy hitters</h2>" + _table(tables["heavy_hitters_model"], 15))
        scores = (
            heavy_hitters.token_scores(trace)
            .group_by("position")
            .agg(pl.col("received_norm").mean())
            .sort("position")
        )
        parts.append(
            _figure(
                figures.token_scores(
                    scores["position"].to_list(),
                    trace.tokens,
                    scores["received_norm"].to_list(),
                    "received attention per token",
                ),
                "received",
            )
        )
        parts.append(
            _figure(
                figures.layer_head_heatmap(tables["sinks"], "sink_mass", "sink mass per head"),
                "sinks",
            )
        )
        parts.append(
            _figure(
                figures.layer_layer(
                    tables["heavy_hitters_layer_overlap"],
                    "jaccard",
                    "top-16 overlap between layers",
                ),
                "overlap",
            )
        )
    if "persistence" in tables:
        parts.append(
            _figure(
                figures.layer_head_heatmap(tables["persistence"], "persistence", "persistence"),
                "persistence",
            )
        )
    if "retrieval_heads" in tables:
        parts.append("<h2>Retrieval heads</h2>")
        parts.append(
            _figure(
                figures.layer_head_heatmap(
                    tables["retrieval_heads"], "retrieval", "retrieval score"
                ),
                "retrieval",
            )
        )
    if "outlier_channels" in tables:
        parts.append("<h2>Outlier channels</h2>")
        parts.append(_table(outliers.outlier_summary(tables["outlier_channels"]), 100))
        for kind in outliers.KINDS:
            if tables["outlier_channels"].filter(kind=kind).height:
                parts.append(
                    _figure(
                        figures.channel_heatmap(
                            tables["outlier_channels"], kind, f"mean |x| ({kind})"
                        ),
                        "channels",
                    )
                )
        parts.append(
            _figure(
                figures.quant_error_bars(tables["quantization_error"], "quantisation error"),
                "quant",
            )
        )
    if "similarity_key" in tables:
        parts.append("<h2>Cross-layer similarity</h2>")
        parts.append(
            _figure(
                figures.layer_layer(
                    tables["similarity_key"], "cosine", "key cosine between layers"
                ),
                "cosine",
            )
        )
        parts.append(
            _figure(figures.layer_layer(tables["cka_key"], "cka", "key CKA between layers"), "cka")
        )
        parts.append(_table(tables["svd_energy_key"].filter(pl.col("group_size") > 0).head(40)))
    if "head_types" in tables:
        parts.append("<h2>Head types</h2>" + _table(tables["head_types"], 300))
    if comparison:
        results = comparison["results"]
        parts.append("<h2>Compression comparison</h2>")
        columns = ["spec", "text", "kl_mean", "top1", "ppl", "accuracy", "bytes_ratio", "time_s"]
        if all(r.get("accuracy") is None for r in results):
            columns.remove("accuracy")  # a free prompt has no answer to score
        parts.append(_table([{k: r[k] for k in columns} for r in results]))
        parts.append(
            "<p>bytes_ratio: bytes held vs the full cache, as a 16-bit server holds them. "
            "KL and top-1: next-token distributions vs the full cache, teacher forced.</p>"
        )
        parts.append(_figure(figures.kl_curves(results, "per-step KL vs the full cache"), "kl"))
        parts.append(_figure(figures.memory_quality(results, "memory vs quality"), "memory"))
    if sweep is not None and sweep.height:
        from methods.sweep import leaderboard

        board = leaderboard(sweep)
        parts.append("<h2>Leaderboard</h2>")
        for (model, task, length), part in board.group_by(
            "model", "task", "length", maintain_order=True
        ):
            parts.append(
                _figure(
                    figures.leaderboard(part, f"{model}, {task}, {length} tokens"), "leaderboard"
                )
            )
        parts.append(_table(board, 200))
    if sparse:
        parts += _sparse_section(sparse)
    if reuse:
        parts += _reuse_section(reuse)
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>kvlens report</title>'
        f'<style>{STYLE}</style><script type="text/javascript">{get_plotlyjs()}</script></head>'
        f"<body>{body}</body></html>"
    )


def _sparse_section(result: dict) -> list[str]:
    """Sparse attention: recall against tokens read, the runs, per-head recall, hard heads."""
    from analysis.sparse_recall import hard_heads, head_recall
    from app import sparse_figures

    columns = ["spec", "tokens_read", "recall", "oracle_recall", "output_error", "kl_mean"]
    columns += ["top1", "accuracy", "bytes_device", "bytes_host", "bytes_read_per_step"]
    out = ["<h2>Sparse attention</h2>"]
    out.append(
        _figure(
            sparse_figures.recall_vs_read(result["curve"], "attention recall against tokens read"),
            "sparse_curve",
        )
    )
    out.append(_table([{k: r.get(k) for k in columns} for r in result["runs"]]))
    out.append(
        f"<p>recall: the share of the full attention mass a method's selection holds (mean over "
        f"layers, heads, steps); oracle_recall: each head's own top tokens at the same read. "
        f"Bytes as a 16-bit server holds them; the full cache holds {result['full_bytes']:,} "
        f"and reads all of it at every step.</p>"
    )
    for spec in result["reads"]:
        heads = head_recall(result["table"].filter(method=spec), spec)
        out.append(
            _figure(
                figures.layer_head_heatmap(heads, "recall", f"{spec}: mean recall per head"),
                "sparse_heads",
            )
        )
    out.append("<h3>Hard heads (recall below 0.5 under every run)</h3>")
    out.append(_table(hard_heads(result["table"], 0.5), 100))
    return out


def _reuse_section(result: dict) -> list[str]:
    """Chunk reuse: quality against the recomputed share, the runs, deviation per layer."""
    from app import reuse_figures

    s = result["settings"]
    out = ["<h2>Chunk reuse</h2>"]
    out.append(
        f"<p>{html.escape(str(s['kind']))}: {s['chunks']} chunks of about {s['chunk_tokens']} "
        f"tokens, seed {s['seed']}; answer {html.escape(str(result['answer']))}.</p>"
    )
    results = result["results"]
    out.append(
        _figure(
            reuse_figures.quality_curve(results, "kl_mean", "KL against the recomputed share"),
            "reuse_curve",
        )
    )
    columns = ["spec", "accuracy", "kl_mean", "top1", "recomputed", "flops_saved", "text"]
    out.append(_table([{k: r.get(k) for k in columns} for r in results]))
    for spec, summary in result["summary"].items():
        out.append(
            _figure(
                reuse_figures.layer_deviation(summary, f"{spec}: deviation per layer"),
                "reuse_layers",
            )
        )
    return out
