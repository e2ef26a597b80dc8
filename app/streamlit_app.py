"""The kvlens web app: `kvlens app` runs this file with Streamlit."""

from __future__ import annotations

import streamlit as st

from app import background, state
from pages import (
    attention,
    chunk_reuse,
    compression_lab,
    cross_layer,
    heavy_hitters,
    leaderboard,
    outliers,
    probe,
    report,
    retrieval_heads,
    sparse_attention,
)

st.set_page_config(page_title="kvlens", layout="wide")
state.keep_inputs()

PAGES = [
    # The first page is served at "/"; the hidden twin makes "/probe" a working deep link.
    st.Page(probe.render, title="Probe", url_path="start", default=True),
    st.Page(probe.render, title="Probe", url_path="probe", visibility="hidden"),
    st.Page(attention.render, title="Attention", url_path="attention"),
    st.Page(heavy_hitters.render, title="Heavy hitters", url_path="heavy-hitters"),
    st.Page(retrieval_heads.render, title="Retrieval heads", url_path="retrieval-heads"),
    st.Page(outliers.render, title="Outlier channels", url_path="outliers"),
    st.Page(cross_layer.render, title="Cross-layer", url_path="cross-layer"),
    st.Page(compression_lab.render, title="Compression lab", url_path="compression-lab"),
    st.Page(sparse_attention.render, title="Sparse attention", url_path="sparse-attention"),
    st.Page(chunk_reuse.render, title="Chunk reuse", url_path="chunk-reuse"),
    st.Page(leaderboard.render, title="Leaderboard", url_path="leaderboard"),
    st.Page(report.render, title="Report", url_path="report"),
]

page = st.navigation(PAGES)
with st.sidebar:
    label = st.empty()
    state.compare_picker()
label.caption(state.trace_label())
finished = background.job("probe")
if finished is not None and finished.done and page.url_path not in ("start", "probe", ""):
    # a probe that ended while the user was on another page becomes the current trace here,
    # before this page draws (the Probe page hands it over itself)
    background.panel("probe", probe.store_probe)
    label.caption(state.trace_label())
page.run()
# the page may have made a new trace: the label is written again after it ran
label.caption(state.trace_label())
