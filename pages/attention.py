"""Attention page: a layer x head overview, one head's map, and a token view."""

from __future__ import annotations

import polars as pl
import streamlit as st

from app import figures, state


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
        "overview", ["entropy", "sink_mass", "local_mass"], horizontal=True, key="attn_measure"
    )
    event = st.plotly_chart(
        figures.layer_head_heatmap(overview, measure, f"mean {measure} per head (click a head)"),
        on_select="rerun",
        selection_mode="points",
        key="attn_grid",
    )
    layer, head = state.head_selector("attn", trace.model.n_layers, trace.model.n_heads, event)
    name = f"layers.{layer}.attn"
    n = trace.n_prompt_tokens
    if name in trace.tensors:
        probs = trace.tensors[name][head].float().numpy()
        st.plotly_chart(
            figures.attention_map(probs, trace.tokens[:n], f"layer {layer}, head {head}"),
            key="attn_map",
        )
        query = st.slider("query token", 0, n - 1, n - 1, key="attn_query")
        row = probs[query, : query + 1]
        st.plotly_chart(
            figures.token_scores(
                list(range(query + 1)),
                trace.tokens,
                row.tolist(),
                f"what token {query} ({trace.tokens[query]!r}) attends to",
            ),
            key="attn_row",
        )
    else:
        st.caption(
            "full maps were not captured (long prompt or attention=stats): showing statistics"
        )
    keys = trace.key_stats.filter(layer=layer, head=head).sort("position")
    st.plotly_chart(
        figures.token_scores(
            keys["position"].to_list(),
            trace.tokens,
            keys["received_norm"].to_list(),
            f"attention received per token, layer {layer} head {head} (normalised)",
        ),
        key="attn_received",
    )
