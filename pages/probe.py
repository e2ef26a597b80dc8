"""Probe page: choose a model and a prompt (typed, a saved dump, or a needle task), run, save."""

from __future__ import annotations

import streamlit as st

from app import state
from probes.models import DEFAULT_MODEL, EMBEDDED


def _run_probe(model_name: str, text: str, attention: str, generate: int) -> None:
    from probes import capture

    model, tokenizer = state.model(model_name)
    n_layers = model.config.num_hidden_layers
    bar = st.progress(0.0, text="probing ...")
    calls = {"n": 0}
    total = n_layers * (1 + generate)

    def progress(_layer: int) -> None:
        calls["n"] += 1
        bar.progress(
            min(1.0, calls["n"] / total), text=f"probing: layer {calls['n'] % n_layers or n_layers}"
        )

    trace = capture(
        model, tokenizer, text, attention=attention, generate=generate, progress=progress
    )
    bar.empty()
    state.set_trace(trace, f"{model_name}, {trace.n_tokens} tokens")
    st.session_state["model_name"] = model_name
    st.success(
        f"probed {trace.n_tokens} tokens in {trace.timings['total_s']:.2f} s "
        f"(attention: {trace.settings['attention']})"
    )


def render() -> None:
    st.title("Probe")
    source = st.radio(
        "input", ["prompt", "needle task", "saved dump"], horizontal=True, key="probe_source"
    )
    if source == "saved dump":
        names = state.dump_names()
        if not names:
            st.info("no dumps in cache_dumps/ yet")
            return
        name = st.selectbox("dump", names, key="probe_dump")
        if st.button("Open dump", key="probe_open"):
            from probes import Trace

            def load():
                t = Trace.load(state.safe_dump_path(name))
                state.set_trace(t, f"dump {name}")
                st.session_state["model_name"] = t.model.model_id
                st.success(f"opened {name}: {t.n_tokens} tokens")

            state.guarded(load)
        return
    choices = [m for m in EMBEDDED if EMBEDDED[m].installed()]
    c1, c2, c3 = st.columns([2, 1, 1])
    model_name = c1.selectbox(
        "model",
        choices + ["local path ..."],
        index=choices.index(DEFAULT_MODEL) if DEFAULT_MODEL in choices else 0,
        key="probe_model",
    )
    if model_name == "local path ...":
        model_name = c1.text_input("model folder or .gguf file", key="probe_model_path")
    attention = c2.selectbox("attention", ["auto", "full", "stats", "none"], key="probe_attention")
    generate = c3.number_input("generate tokens", 0, 256, 0, key="probe_generate")
    if source == "needle task":
        t1, t2, t3, t4 = st.columns(4)
        kind = t1.selectbox("task", ["niah", "multikey", "vartrack"], key="task_kind")
        length = t2.number_input("length (tokens)", 64, 8000, 512, step=64, key="task_length")
        depth = t3.slider("depth", 0.0, 1.0, 0.5, key="task_depth")
        seed = t4.number_input("seed", 0, 10_000, 0, key="task_seed")
        text = None
    else:
        text = st.text_area(
            "prompt",
            height=160,
            key="probe_prompt",
            placeholder="Paste or type the text to run through the model",
        )
    if st.button("Run probe", type="primary", key="probe_run"):

        def run():
            prompt = text
            if source == "needle task":
                from probes.tasks import make_task

                _, tokenizer = state.model(model_name)
                task = make_task(kind, int(length), tokenizer, depth=float(depth), seed=int(seed))
                prompt = task.prompt
                st.session_state["task"] = task
            else:
                st.session_state.pop("task", None)
            _run_probe(model_name, prompt or "", attention, int(generate))

        state.guarded(run)
    trace = state.trace()
    if trace is not None:
        st.subheader("Current trace")
        m = trace.model
        st.write(
            f"{m.model_id}: {trace.n_tokens} tokens, {m.n_layers} layers, "
            f"{m.n_heads} heads / {m.n_kv_heads} KV heads, head_dim {m.head_dim}"
        )
        c1, c2 = st.columns([3, 1])
        name = c1.text_input(
            "save as (inside cache_dumps/)", key="save_name", placeholder="my-dump"
        )
        if c2.button("Save dump", key="save_dump"):
            state.guarded(lambda: st.success(f"saved {trace.save(state.safe_dump_path(name))}"))
