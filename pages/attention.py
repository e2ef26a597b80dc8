"""Attention page: a layer x head overview (click a head), one head's map, and a token view."""

from __future__ import annotations

import polars as pl
import streamlit as st

from app import figures, state

MEASURES = {
    "entropy": "spread of a head's attention (high = spread out, low = focused on few tokens)",
    "sink_mass": "attention mass on the first tokens: attention sinks (Xiao et al., StreamingLLM)",
    "local_mass": "attention mass on nearby tokens: local heads, which a sliding window serves",
}


def render() -> None:
    st.title("Attention")
    trace = state.require_trace()
    if trace.query_stats is None:
        st.info("this trace has no attention statistics (probed with attention=none)")
        return
    overview = state.table(
        "attn_overview",
        lambda: trace.query_stats.group_by("layer", "head").agg(
            pl.col("entropy").mean(), pl.col("sink_mass").mean(), pl.col("local_mass").mean()
        ),
    )
    measure = st.radio(
        "overview",
        list(MEASURES),
        horizontal=True,
        key="attn_measure",
        help="; ".join(f"{k}: {v}" for k, v in MEASURES.items()),
    )
    second = state.second_trace()
    left, right = st.columns(2) if second is not None else (st.container(), None)
    event = left.plotly_chart(
        figures.layer_head_heatmap(
            overview, measure, f"mean {measure} per head (click a head)", clickable=True
        ),
        on_select="rerun",
        selection_mode="points",
        key="attn_grid",
    )
    if right is not None:
        _second_overview(right, measure)
    st.caption(
        f"One cell per query head, averaged over the prompt's queries: {MEASURES[measure]}. "
        "Click a cell to show that head below."
    )
    layer, head = state.head_selector("attn", trace.model.n_layers, trace.model.n_heads, event)
    name = f"layers.{layer}.attn"
    n = trace.n_prompt_tokens
    if name in trace.tensors:
        probs = trace.tensors[name][head].float().numpy()
        st.plotly_chart(
            figures.attention_map(probs[:n, :n], trace.tokens[:n], f"layer {layer}, head {head}"),
            key="attn_map",
        )
        st.caption(
            "Row = a query token, column = a token it attends to; darker = more attention. "
            "Causal, so nothing above the diagonal. A dark first column is an attention sink."
        )
        for chart in ("attn_row", "attn_received"):  # a click on a token's bar selects it
            x = state.clicked_x(chart)
            if x is not None and 0 <= x < n:
                st.session_state["attn_query"] = x
        query = st.slider(
            "query token",
            0,
            n - 1,
            n - 1,
            key="attn_query",
            help="the token whose attention row is shown below; or click a token's bar",
        )
        row = probs[query, : query + 1]
        st.plotly_chart(
            figures.token_scores(
                list(range(query + 1)),
                trace.tokens,
                row.tolist(),
                f"what token {query} ({trace.tokens[query]!r}) attends to",
                y_title="attention probability",
            ),
            key="attn_row",
            on_select="rerun",
            selection_mode="points",
        )
        st.caption(
            "One row of the map above as bars; hover a bar for its token, click it to follow "
            "the attention to that token."
        )
    else:
        st.caption(
            "full maps were not captured (long prompt or attention=stats): showing statistics"
        )
    keys = trace.key_stats.filter(layer=layer, head=head).sort("position")
    clickable = {"on_select": "rerun", "selection_mode": "points"} if name in trace.tensors else {}
    st.plotly_chart(
        figures.token_scores(
            keys["position"].to_list(),
            trace.tokens,
            keys["received_norm"].to_list(),
            f"attention received per token, layer {layer} head {head} (normalised)",
            y_title="attention received (normalised)",
        ),
        key="attn_received",
        **clickable,
    )
    st.caption(
        "Attention each token receives from later queries, divided by how many queries see "
        "it: the score H2O (Zhang et al., 2023) keeps tokens by. Tall bars are heavy hitters"
        + ("; click one to make it the query." if clickable else ".")
    )


def _second_overview(col, measure: str) -> None:
    """The same overview for the trace chosen in the sidebar's 'compare with'."""
    other = state.second_table(
        "attn_overview",
        lambda t: (
            t.query_stats.group_by("layer", "head").agg(
                pl.col("entropy").mean(), pl.col("sink_mass").mean(), pl.col("local_mass").mean()
            )
            if t.query_stats is not None
            else None
        ),
    )
    if other is None:
        col.info("the trace to compare with has no attention statistics")
        return
    col.plotly_chart(
        figures.layer_head_heatmap(other, measure, f"{state.second_label()}: mean {measure}"),
        key="attn_grid_second",
    )
