"""Retrieval heads page: run the needle detection and show retrieval / echo / induction scores."""

from __future__ import annotations

import streamlit as st

from app import figures, state


def render() -> None:
    st.title("Retrieval heads")
    c1, c2, c3 = st.columns(3)
    lengths = c1.text_input("needle lengths (tokens)", "256,512", key="rh_lengths")
    depths = c2.text_input("depths", "0.2,0.8", key="rh_depths")
    seed = c3.number_input("seed", 0, 1000, 0, key="rh_seed")
    model_name = st.session_state.get("model_name", "smollm2-135m")
    if st.button("Detect retrieval heads", type="primary", key="rh_run"):

        def run():
            from app.jobs import find_retrieval_heads
            from probes.errors import KvlensError

            try:
                ls = [int(x) for x in lengths.split(",") if x.strip()]
                ds = [float(x) for x in depths.split(",") if x.strip()]
            except ValueError:
                raise KvlensError("lengths and depths are comma-separated numbers") from None
            model, tokenizer = state.model(model_name)
            bar = st.progress(0.0, text="needle probes ...")
            total = len(ls) * len(ds) + 1
            done = {"n": 0}

            def progress(name: str) -> None:
                done["n"] += 1
                bar.progress(min(1.0, done["n"] / total), text=name)

            st.session_state["retrieval"] = find_retrieval_heads(
                model, tokenizer, ls, ds, seed=int(seed), progress=progress
            )
            bar.empty()

        state.guarded(run)
    scores = st.session_state.get("retrieval")
    if scores is None:
        st.info("run the detection to see scores")
        return
    measure = st.radio(
        "score", ["retrieval", "echo", "induction"], horizontal=True, key="rh_measure"
    )
    st.plotly_chart(
        figures.layer_head_heatmap(scores, measure, f"{measure} score per head"), key="rh_map"
    )
    st.dataframe(scores.sort(measure, descending=True).head(10), hide_index=True)
