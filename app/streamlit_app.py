"""The kvlens web app: `kvlens app` runs this file with Streamlit."""

from __future__ import annotations

import streamlit as st

from pages import (
    attention,
    compression_lab,
    cross_layer,
    heavy_hitters,
    leaderboard,
    outliers,
    probe,
    report,
    retrieval_heads,
)

st.set_page_config(page_title="kvlens", layout="wide")

PAGES = [
    st.Page(probe.render, title="Probe", url_path="probe", default=True),
    st.Page(attention.render, title="Attention", url_path="attention"),
    st.Page(heavy_hitters.render, title="Heavy hitters", url_path="heavy-hitters"),
    st.Page(retrieval_heads.render, title="Retrieval heads", url_path="retrieval-heads"),
    st.Page(outliers.render, title="Outlier channels", url_path="outliers"),
    st.Page(cross_layer.render, title="Cross-layer", url_path="cross-layer"),
    st.Page(compression_lab.render, title="Compression lab", url_path="compression-lab"),
    st.Page(leaderboard.render, title="Leaderboard", url_path="leaderboard"),
    st.Page(report.render, title="Report", url_path="report"),
]

with st.sidebar:
    label = st.session_state.get("trace_label")
    st.caption(f"trace: {label}" if label else "no trace yet")
st.navigation(PAGES).run()
