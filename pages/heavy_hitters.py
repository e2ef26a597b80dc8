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
    k = c1.slider(
        "top k", 4, 64, 16, key="hh_k", help="how many of the heaviest tokens count as heavy"
    )
    by = c2.radio(
        "score",
        list(heavy_hitters.SCORES),
        horizontal=True,
        key="hh_by",
        index=1,
        help="received: attention summed over queries (H2O); received_norm: divided by how "
        "many queries can see the token, so early tokens are not favoured by position alone; "
        "window: attention from the last queries only (SnapKV's observation window)",
    )
    with st.spinner("attention received per token (once per trace) ..."):
        top = state.table(f"hh_model_{by}", lambda: heavy_hitters.model_top(trace, 30, by))
        scores = state.table("hh_scores", lambda: heavy_hitters.token_scores(trace))
    st.subheader("Heaviest tokens (mean over layers and heads)")
    st.dataframe(top.head(k), hide_index=True)
    _token_bars(scores, top, trace.tokens, by, k, f"{by} per token, mean over heads", "hh_bar")
    st.caption(
        f"Attention each token receives, averaged over all heads; the top {k} in blue. A few "
        "tokens draw most of the attention: the heavy hitters H2O (Zhang et al., 2023) keeps."
    )
    _second_tokens(by, k)
    sinks = state.table("hh_sinks", lambda: heavy_hitters.sinks(trace))
    second = state.second_trace()
    left, right = st.columns(2) if second is not None else (st.container(), None)
    left.plotly_chart(
        figures.layer_head_heatmap(
            sinks, "sink_mass", "attention mass on the first tokens (sinks)"
        ),
        key="hh_sinks",
    )
    if right is not None and second.query_stats is not None:
        other = state.second_table("hh_sinks", heavy_hitters.sinks)
        right.plotly_chart(
            figures.layer_head_heatmap(other, "sink_mass", f"{state.second_label()}: sinks"),
            key="hh_sinks_second",
        )
    st.caption(
        "Per head, the share of attention on the first tokens whatever they say: attention "
        "sinks (Xiao et al., 2023, StreamingLLM keeps them). Bright = a sink-heavy head."
    )
    overlap = state.table(
        f"hh_layer_overlap_{k}_{by}", lambda: heavy_hitters.layer_overlap(trace, k, by)
    )
    st.plotly_chart(
        figures.layer_layer(overlap, "jaccard", f"top-{k} overlap between layers (Jaccard)"),
        key="hh_overlap",
    )
    st.caption(
        "How much two layers agree on their top tokens (1 = the same set). High overlap means "
        "one selection can serve several layers; PyramidKV and MiniCache rely on it."
    )
    if trace.step_stats is not None:
        pers = state.table(f"hh_persistence_{k}", lambda: heavy_hitters.persistence(trace, k))
        st.plotly_chart(
            figures.layer_head_heatmap(
                pers, "persistence", f"top-{k} persistence between decoding steps"
            ),
            key="hh_pers",
        )
        st.caption(
            "Per head, the share of its top tokens that stay on top from one generated token "
            "to the next: the persistence of importance (Liu et al., 2023, Scissorhands). "
            "High = evicting by past attention is safe for this head."
        )
    else:
        st.caption("persistence needs decoding steps: probe with 'generate tokens' > 0")


def _second_tokens(by: str, k: int) -> None:
    """Attention received per token for the trace chosen in the sidebar's 'compare with'."""
    second = state.second_trace()
    if second is None or second.key_stats is None:
        return
    scores = state.second_table("hh_scores", heavy_hitters.token_scores)
    top = state.second_table(f"hh_model_{by}", lambda t: heavy_hitters.model_top(t, 30, by))
    title = f"{state.second_label()}: {by} per token"
    _token_bars(scores, top, second.tokens, by, k, title, "hh_bar_second")
    st.caption("The same view for the trace chosen in the sidebar's 'compare with'.")


def _token_bars(scores, top, tokens: list[str], by: str, k: int, title: str, key: str) -> None:
    """Bars of ``by`` per token (mean over layers and heads), the top ``k`` highlighted."""
    mean = scores.group_by("position").agg(pl.col(by).mean()).sort("position")
    st.plotly_chart(
        figures.token_scores(
            mean["position"].to_list(),
            tokens,
            mean[by].to_list(),
            title,
            highlight=set(top.head(k)["position"].to_list()),
            y_title=by,
        ),
        key=key,
    )
