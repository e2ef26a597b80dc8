"""Outlier channels page: channel magnitudes and quantisation error by grouping and rotation."""

from __future__ import annotations

import streamlit as st

from analysis import outliers
from app import figures, state


def render() -> None:
    st.title("Outlier channels")
    trace = state.require_trace()
    if not any(n.endswith(".key") for n in trace.tensors):
        st.info("this trace has no keys/values (probed with --no-kv)")
        return
    stats = state.table("outlier_stats", lambda: outliers.channel_stats(trace))
    kind = st.radio("tensor", list(outliers.KINDS), horizontal=True, key="out_kind")
    st.plotly_chart(
        figures.channel_heatmap(stats, kind, f"mean |x| per channel ({kind})"), key="out_heat"
    )
    st.dataframe(outliers.outlier_summary(stats).filter(kind=kind), hide_index=True)
    q = state.table("quant_error", lambda: outliers.quantization_error(trace))
    st.plotly_chart(
        figures.quant_error_bars(
            q, "quantisation error: per channel vs per token, with/without rotation"
        ),
        key="out_quant",
    )
