"""Compression lab: run methods live on the current prompt and compare them with the full cache."""

from __future__ import annotations

import dataclasses
import difflib
import html

import streamlit as st

from app import figures, state
from methods.registry import available


def _marked_diff(reference: str, text: str) -> str:
    """HTML of ``text`` with words that differ from ``reference`` highlighted (all escaped)."""
    ref, got = reference.split(), text.split()
    out = []
    for op, _a0, _a1, b0, b1 in difflib.SequenceMatcher(a=ref, b=got).get_opcodes():
        words = html.escape(" ".join(got[b0:b1]))
        if not words:
            continue
        out.append(words if op == "equal" else f'<mark style="background:#ffd6d6">{words}</mark>')
    return " ".join(out) or "<i>(empty)</i>"


def _method_widgets(name: str, index: int) -> str:
    cls = available()[name]
    parts = []
    cols = st.columns(max(1, len(dataclasses.fields(cls))))
    for col, f in zip(cols, dataclasses.fields(cls)):
        key = f"lab_{index}_{name}_{f.name}"
        if isinstance(f.default, bool):
            value = col.checkbox(f.name, f.default, key=key)
        elif isinstance(f.default, int):
            value = col.number_input(f.name, value=f.default, step=1, key=key)
        elif isinstance(f.default, float):
            value = col.number_input(f.name, value=f.default, key=key)
        else:
            value = col.text_input(f.name, str(f.default), key=key)
        parts.append(f"{f.name}={value}")
    return f"{name}:{','.join(parts)}" if parts else name


def render() -> None:
    st.title("Compression lab")
    trace = state.require_trace()
    names = list(available())
    chosen = st.multiselect("methods", names, default=["streamingllm", "snapkv"], key="lab_methods")
    specs = ["full"]
    for i, name in enumerate(chosen):
        st.markdown(f"**{name}** — {available()[name].summary}")
        specs.append(_method_widgets(name, i))
    max_new = st.slider("new tokens", 4, 128, 24, key="lab_new")
    if st.button("Run comparison", type="primary", key="lab_run"):

        def run():
            from methods.evaluate import compare

            model, tokenizer = state.model(st.session_state.get("model_name", "smollm2-135m"))
            bar = st.progress(0.0, text="full cache ...")
            done = {"n": 0}

            def progress(spec: str) -> None:
                bar.progress(min(1.0, done["n"] / len(specs)), text=f"running {spec}")
                done["n"] += 1

            task = st.session_state.get("task")
            ids = trace.token_ids[: trace.n_prompt_tokens]
            result = compare(
                model,
                tokenizer,
                ids,
                specs,
                max_new_tokens=max_new,
                score=task.score if task else None,
                continuation=task.continuation if task else None,
                progress=progress,
            )
            bar.empty()
            st.session_state["comparison"] = result.to_json()

        state.guarded(run)
    comparison = st.session_state.get("comparison")
    if not comparison:
        return
    specs = [r["spec"] for r in comparison["results"]]
    results = comparison["results"]
    full = next(r for r in results if r["spec"] == "full")
    st.subheader("Outputs")
    cols = st.columns(len(results))
    for col, r in zip(cols, results):
        col.markdown(f"**{html.escape(r['spec'])}**")
        body = (
            html.escape(r["text"]) if r["spec"] == "full" else _marked_diff(full["text"], r["text"])
        )
        col.markdown(f'<div class="kvlens-output">{body}</div>', unsafe_allow_html=True)
        acc = "" if r["accuracy"] is None else f", accuracy {r['accuracy']:.2f}"
        col.caption(
            f"KL {r['kl_mean']:.4f}, top-1 {r['top1']:.2f}, "
            f"{100 * r['bytes_ratio']:.1f}% bytes{acc}"
        )
    st.dataframe(
        [
            {
                k: r[k]
                for k in (
                    "spec",
                    "kl_mean",
                    "kl_max",
                    "top1",
                    "ppl",
                    "accuracy",
                    "bytes",
                    "bytes_ratio",
                    "time_s",
                )
            }
            for r in results
        ],
        hide_index=True,
    )
    c1, c2 = st.columns(2)
    c1.plotly_chart(
        figures.kl_curves(results, "per-step KL vs the full cache (teacher forced)"), key="lab_kl"
    )
    c2.plotly_chart(figures.memory_quality(results, "memory vs quality"), key="lab_mq")
    methods = [r for r in results if r["kept_per_layer"]]
    if methods:
        pick = st.selectbox("kept tokens of", [r["spec"] for r in methods], key="lab_kept")
        r = next(x for x in methods if x["spec"] == pick)
        st.plotly_chart(
            figures.kept_heatmap(r, "tokens kept per layer and KV head"), key="lab_kept_fig"
        )
    _xray_section(trace, specs)


def _token_strip(tokens: list[str], kept: set[int], limit: int = 1500) -> str:
    """The prompt as coloured spans: kept tokens green, evicted red (text escaped)."""
    spans = []
    for i, tok in enumerate(tokens[:limit]):
        colour = "#c8f7c5" if i in kept else "#f7c5c5"
        spans.append(f'<span title="{i}" style="background:{colour}">{html.escape(tok)}</span>')
    more = f" … ({len(tokens) - limit} more)" if len(tokens) > limit else ""
    return '<div class="kvlens-strip" style="line-height:1.8">' + "".join(spans) + more + "</div>"


def _xray_section(trace, specs: list[str]) -> None:
    st.subheader("X-ray")
    methods = [s for s in specs if s != "full"]
    if not methods:
        return
    spec = st.selectbox("X-ray of", methods, key="xray_spec")
    if st.button("Run X-ray", key="xray_run"):

        def run():
            from methods.xray import xray

            model, tokenizer = state.model(st.session_state.get("model_name", "smollm2-135m"))
            with st.spinner("teacher-forcing the method and probing the full model ..."):
                st.session_state["xray"] = xray(
                    model,
                    tokenizer,
                    trace.token_ids[: trace.n_prompt_tokens],
                    spec,
                    max_new_tokens=st.session_state.get("lab_new", 24),
                )

        state.guarded(run)
    x = st.session_state.get("xray")
    if x is None:
        return
    import polars as pl

    if x.first_divergence is None:
        st.write(f"**{html.escape(x.spec)}** never diverged from the full cache.")
    else:
        st.write(
            f"**{html.escape(x.spec)}** first differs at generated token {x.first_divergence}; "
            "heads that lost the most attention there:"
        )
        st.dataframe(x.culprit_heads, hide_index=True)
    mean = x.dropped.group_by("layer", "head").agg(pl.col("dropped_mass").mean())
    st.plotly_chart(
        figures.layer_head_heatmap(
            mean, "dropped_mass", "attention mass on evicted tokens (mean over steps)"
        ),
        key="xray_dropped",
    )
    c1, c2 = st.columns(2)
    layer = c1.number_input("layer", 0, trace.model.n_layers - 1, 0, key="xray_layer")
    kv_head = c2.number_input("KV head", 0, trace.model.n_kv_heads - 1, 0, key="xray_head")
    row = x.kept.filter(step=0, layer=int(layer), kv_head=int(kv_head))
    kept = set(row["positions"][0].to_list()) if row.height else set()
    n = trace.n_prompt_tokens
    st.caption(f"kept after prefill: {len(kept)} of {n} prompt tokens (green kept, red evicted)")
    st.markdown(_token_strip(trace.tokens[:n], kept), unsafe_allow_html=True)
    if trace.key_stats is not None:
        scores = (
            trace.key_stats.filter(layer=int(layer), kv_head=int(kv_head))
            .group_by("position")
            .agg(pl.col("received_norm").mean())
            .sort("position")
        )
        st.plotly_chart(
            figures.token_scores(
                scores["position"].to_list(),
                trace.tokens,
                scores["received_norm"].to_list(),
                "heavy hitters of this KV head; kept tokens in red",
                highlight=kept,
            ),
            key="xray_hh",
        )
