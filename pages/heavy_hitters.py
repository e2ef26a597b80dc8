"""Heavy hitters page: accumulated attention per token, top-k overlap, sinks, persistence."""

from __future__ import annotations

import polars as pl
import streamlit as st

from analysis import heavy_hitters
from app import figures, state


def render() -> None:
    st.title("Heavy hitters")
    trace = state.require_trace()
    if trace.key_stats is None:
        st.info("this trace has no attention statistics")
        return
    c1, c2 = st.columns(2)
    k = c1.slider("top k", 4, 64, 16, key="hh_k")
    by = c2.radio("score", list(heavy_hitters.SCORES), horizontal=True, key="hh_by", index=1)
    top = state.table(f"hh_model_{by}", lambda: heavy_hitters.model_top(trace, 30, by))
    st.subheader("Heaviest tokens (mean over layers and heads)")
    st.dataframe(top.head(k), hide_index=True)
    scores = state.table(f"hh_scores_{by}", lambda: heavy_hitters.token_scores(trace))
    mean = scores.group_by("position").agg(pl.col(by).mean()).sort("position")
    st.plotly_chart(
        figures.token_scores(
            mean["position"].to_list(),
            trace.tokens,
            mean[by].to_list(),
            f"{by} per token, mean over heads",
            highlight=set(top.head(k)["position"].to_list()),
        ),
        key="hh_bar",
    )
    sinks = state.table("hh_sinks", lambda: heavy_hitters.sinks(trace))
    st.plotly_chart(
        figures.layer_head_heatmap(
            sinks, "sink_mass", "attention mass on the first tokens (sinks)"
        ),
        key="hh_sinks",
    )
    overlap = state.table(
        f"hh_layer_overlap_{k}_{by}", lambda: heavy_hitters.layer_overlap(trace, k, by)
    )
    st.plotly_chart(
        figures.layer_layer(overlap, "jaccard", f"top-{k} overlap between layers (Jaccard)"),
        key="hh_overlap",
    )
    if trace.step_stats is not None:
        pers = state.table(f"hh_persistence_{k}", lambda: heavy_hitters.persistence(trace, k))
        st.plotly_chart(
            figures.layer_head_heatmap(
                pers, "persistence", f"top-{k} persistence between decoding steps"
            ),
            key="hh_pers",
        )
    else:
        st.caption("persistence needs decoding steps: probe with 'generate tokens' > 0")
