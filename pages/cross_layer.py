"""Cross-layer page: layer x layer similarity and CKA, adjacent curves, latent attention
readiness (TransMLA), UMAP of keys."""

from __future__ import annotations

import streamlit as st

from analysis import cross_layer, heavy_hitters, latent
from app import background, figures, state


def render() -> None:
    st.title("Cross-layer similarity")
    trace = state.require_trace()
    if not any(n.endswith(".key") for n in trace.tensors):
        st.info("this trace has no keys/values")
        return
    kind = st.radio(
        "tensor",
        ["key", "value"],
        horizontal=True,
        key="cl_kind",
        help="compare the layers' cached keys (after RoPE) or values",
    )
    layers = [n for n in trace.layers if f"layers.{n}.key" in trace.tensors]
    pre = all(f"layers.{n}.key_pre_rope" in trace.tensors for n in layers)
    computes = {
        f"sim_{kind}": lambda: cross_layer.pair_similarity(trace, kind),
        f"cka_{kind}": lambda: cross_layer.cka(trace, kind),
        "latent": lambda: latent.latent_summary(trace),
    }
    if pre:
        computes["latent_post_rope"] = lambda: latent.latent_summary(
            trace, keys="post_rope", kinds=("key",)
        )
    tables = background.tables("cl_tables", computes, "layer similarity and spectra")
    if tables is not None:
        _similarity(tables, kind, pre)
    _umap(trace)


def _similarity(tables: dict, kind: str, pre: bool) -> None:
    sim, cka = tables[f"sim_{kind}"], tables[f"cka_{kind}"]
    c1, c2 = st.columns(2)
    c1.plotly_chart(
        figures.layer_layer(sim, "cosine", f"per-token cosine between layers ({kind})"),
        key="cl_cos",
    )
    c1.caption(
        "Mean cosine between the same token's vectors in two layers: blue = alike, red = "
        "opposite. MiniCache (Liu et al., 2024) merges adjacent layers where this is high."
    )
    c2.plotly_chart(figures.adjacent_curve(sim, "cosine", "adjacent layers"), key="cl_adj")
    c2.caption("The diagonal next to the main one: each layer against the next.")
    st.plotly_chart(figures.layer_layer(cka, "cka", f"linear CKA ({kind})"), key="cl_cka")
    st.caption(
        "Linear CKA (Kornblith et al., 2019): 1 = the layers hold the same information up to "
        "a rotation and scale, even when the cosines differ; the basis of xKV's shared subspace."
    )
    st.subheader(
        "Latent attention readiness",
        help="how much of each layer's K/V one latent shared by all KV heads keeps at half "
        "the GQA cache width (n_kv x head_dim / 2): near 1 = the layer converts to latent "
        "attention with little loss; hover for the ranks that keep 90% and 99%",
    )
    summary = tables["latent"]
    keys = summary.filter(kind="key")
    series = {
        "keys (pre-RoPE)" if pre else "keys (post-RoPE: none before RoPE here)": keys,
        "values": summary.filter(kind="value"),
        "keys and values jointly (balanced)": summary.filter(kind="joint"),
    }
    if pre:
        series["keys (post-RoPE, as cached)"] = tables["latent_post_rope"]
    width = int(summary.filter(kind="key")["width"][0])
    st.plotly_chart(
        figures.latent_readiness(series, "energy a latent of half the GQA cache keeps"),
        key="cl_latent",
    )
    st.caption(
        "TransMLA (Meng et al. 2025) rewrites GQA as multi-head latent attention: all KV "
        "heads' keys (before RoPE) and values are compressed jointly into one latent per token. "
        f"Each point: the share of a layer's energy (squared singular values of its {width} "
        "stacked key or value columns) the best latent of half that width keeps; the joint "
        "line stacks keys (scaled to the values' mean column norm, as the paper's balanced "
        f"PCA) and values, {2 * width} columns, at rank {width}: an MLA latent of half the "
        "GQA cache. The post-RoPE key line is xKV's single-layer SVD energy (Chang et al. 2025)."
    )


def _umap(trace) -> None:
    st.subheader("UMAP of key vectors")
    c1, c2 = st.columns(2)
    n_layers, n_kv = trace.model.n_layers, trace.model.n_kv_heads
    layer = c1.number_input(
        "layer", 0, n_layers - 1, min(10, n_layers - 1), key="cl_layer", help="layer to map"
    )
    kv_head = c2.number_input(
        "KV head", 0, n_kv - 1, 0, key="cl_head", help="KV head whose keys are mapped"
    )
    if st.button(
        "Compute UMAP",
        key="cl_umap_btn",
        help="up to a minute on CPU; runs in the background (the page stays usable)",
    ):

        def work(job, layer=int(layer), kv_head=int(kv_head)):
            heavy = set()
            if trace.key_stats is not None:
                top = heavy_hitters.top_k(trace, 16).filter(layer=layer, kv_head=kv_head)
                heavy = set(top["position"].to_list())
            job.say(f"UMAP of layer {layer}, KV head {kv_head}")
            result = cross_layer.umap_keys(trace, layer, kv_head, heavy)
            return {"layer": layer, "kv_head": kv_head, "table": result}

        background.start("umap", work)
    background.panel("umap", lambda result: state.put("umap", result))
    umap = state.result("umap")
    if umap is not None:
        st.plotly_chart(
            figures.umap_scatter(
                umap["table"],
                f"keys of layer {umap['layer']}, KV head {umap['kv_head']}, coloured by position",
            ),
            key="cl_umap_fig",
        )
        st.caption(
            "Each dot is one token's key vector, placed by UMAP (McInnes et al., 2018) so that "
            "similar keys sit close; colour = position, diamonds = the top-16 heavy hitters."
        )
