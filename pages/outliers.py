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
    with st.spinner("channel statistics ..."):
        stats = state.table("outlier_stats", lambda: outliers.channel_stats(trace))
    kind = st.radio(
        "tensor",
        list(outliers.KINDS),
        horizontal=True,
        key="out_kind",
        help="keys before RoPE, keys after RoPE (what the cache holds), or values",
    )
    st.plotly_chart(
        figures.channel_heatmap(stats, kind, f"mean |x| per channel ({kind})"), key="out_heat"
    )
    st.caption(
        "One row per layer and KV head, one column per channel; bright = large magnitude. "
        "Bright columns that persist across tokens are outlier channels: why KIVI (Liu et al., "
        "2024) and KVQuant (Hooper et al., 2024) quantise keys per channel."
    )
    st.dataframe(outliers.outlier_summary(stats).filter(kind=kind), hide_index=True)
    with st.spinner("quantisation error ..."):
        q = state.table("quant_error", lambda: outliers.quantization_error(trace))
    st.plotly_chart(
        figures.quant_error_bars(
            q, "quantisation error: per channel vs per token, with/without rotation"
        ),
        key="out_quant",
    )
    st.caption(
        "Relative error of the cache's keys and values after quantising, by grouping and bit "
        "width, with and without a Hadamard rotation that spreads outliers (QuaRot, RotateKV). "
        "Lower is better."
    )
