"""Cross-layer page: layer x layer similarity and CKA, adjacent curves, UMAP of keys."""

from __future__ import annotations

import streamlit as st

from analysis import cross_layer, heavy_hitters
from app import figures, state


def render() -> None:
    st.title("Cross-layer similarity")
    trace = state.require_trace()
    if not any(n.endswith(".key") for n in trace.tensors):
        st.info("this trace has no keys/values")
        return
    kind = st.radio("tensor", ["key", "value"], horizontal=True, key="cl_kind")
    sim = state.table(f"sim_{kind}", lambda: cross_layer.pair_similarity(trace, kind))
    c1, c2 = st.columns(2)
    c1.plotly_chart(
        figures.layer_layer(sim, "cosine", f"per-token cosine between layers ({kind})"),
        key="cl_cos",
    )
    c2.plotly_chart(figures.adjacent_curve(sim, "cosine", "adjacent layers"), key="cl_adj")
    cka = state.table(f"cka_{kind}", lambda: cross_layer.cka(trace, kind))
    st.plotly_chart(figures.layer_layer(cka, "cka", f"linear CKA ({kind})"), key="cl_cka")
    st.subheader("UMAP of key vectors")
    c1, c2 = st.columns(2)
    layer = c1.number_input(
        "layer", 0, trace.model.n_layers - 1, min(10, trace.model.n_layers - 1), key="cl_layer"
    )
    kv_head = c2.number_input("KV head", 0, trace.model.n_kv_heads - 1, 0, key="cl_head")
    if st.button("Compute UMAP", key="cl_umap"):

        def run():
            heavy = set()
            if trace.key_stats is not None:
                top = heavy_hitters.top_k(trace, 16).filter(layer=int(layer), kv_head=int(kv_head))
                heavy = set(top["position"].to_list())
            with st.spinner("UMAP ..."):
                st.session_state["umap"] = cross_layer.umap_keys(
                    trace, int(layer), int(kv_head), heavy
                )

        state.guarded(run)
    if "umap" in st.session_state:
        st.plotly_chart(
            figures.umap_scatter(st.session_state["umap"], "keys, coloured by position"),
            key="cl_umap_fig",
        )
