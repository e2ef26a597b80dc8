"""Probe page: what kvlens does, a one-click example, and a probe of a prompt, a needle task or
a saved dump; the current trace's generated text and, for a needle task, what was asked."""

from __future__ import annotations

import streamlit as st

from app import background, needle, state
from probes.models import DEFAULT_MODEL, EMBEDDED

HELP = {
    "source": "a prompt you type, a synthetic needle-in-a-haystack task, or a dump saved earlier",
    "model": "embedded models load offline; 'local path' takes a Hugging Face folder or a .gguf",
    "attention": (
        "auto: full maps for short prompts, statistics otherwise. full: every head's T x T "
        "map (short prompts only). stats: blockwise statistics (attention received, entropy, "
        "sinks) that scale to long prompts. none: keys and values only, no attention views"
    ),
    "generate": (
        "tokens the model writes after the prompt (greedy); decoding steps feed persistence "
        "and the per-step views. 0 = prompt only"
    ),
    "task": (
        "niah: one magic-number needle. multikey: several needles, the question asks for one. "
        "vartrack: follow a chain of variable assignments"
    ),
    "length": "haystack length in tokens",
    "depth": "where the needle sits in the haystack: 0 = start, 1 = end",
    "seed": "another seed gives other filler text, keys and numbers",
}


def _run_probe(model_name: str, text, attention: str, generate: int, task=None) -> None:
    """Start the probe as a background job (progress and Cancel in the page); its trace
    becomes the current one when it ends, and the current trace stays until then."""
    from app.jobs import probe

    model, tokenizer = state.model(model_name)

    def work(job):
        result = probe(
            model,
            tokenizer,
            text,
            attention=attention,
            generate=generate,
            task=task,
            save=state.autosave,
            say=job.say,
        )
        return {**result, "model_name": model_name}

    calls = model.config.num_hidden_layers * (1 + generate)
    background.start("probe", work, model, calls, for_trace=False)


def store_probe(result: dict) -> None:
    """The probe's trace becomes the current one (once: the job is handed over once)."""
    trace, task, dump = result["trace"], result["task"], result["dump"]
    label = f"{result['model_name']}, {trace.n_tokens} tokens" + (f", {task.kind}" if task else "")
    state.set_trace(trace, label, task=task, dump=dump)
    st.session_state["model_name"] = result["model_name"]
    st.success(
        f"probed {trace.n_tokens} tokens in {trace.timings['total_s']:.2f} s "
        f"(attention: {trace.settings['attention']})"
        + (f"; saved as cache_dumps/{dump}" if dump else "")
    )
    if result["save_error"]:
        st.warning(result["save_error"])


def _run_task(model_name, kind, length, depth, seed, attention, generate) -> None:
    from probes.tasks import make_task

    _, tokenizer = state.model(model_name)
    task = make_task(kind, int(length), tokenizer, depth=float(depth), seed=int(seed))
    _run_probe(model_name, task.prompt, attention, int(generate), task)


def _intro() -> None:
    st.markdown(
        "**kvlens** shows what a language model's attention and KV cache hold (heavy hitters, "
        "retrieval heads, outlier channels) and what each KV-cache compression method keeps, "
        "loses and costs.  \n"
        "Run a prompt through the model here, then open the pages on the left, or compress "
        "it live in the **Compression lab**."
    )
    ex = needle.EXAMPLE
    if st.button(
        "Try an example: find a fact in a 256-token text",
        key="probe_example_btn",
        help=(
            f"probes SmolLM2 with a needle-in-a-haystack prompt ({ex['length']} tokens, a "
            f"magic number at depth {ex['depth']}) and lets it write {ex['generate']} tokens"
        ),
    ):
        state.guarded(
            lambda: _run_task(
                DEFAULT_MODEL,
                ex["kind"],
                ex["length"],
                ex["depth"],
                ex["seed"],
                "auto",
                ex["generate"],
            )
        )


def _open_section(source: str) -> None:
    if source == "saved dump":
        names = state.dump_names()
        if not names:
            st.info("no dumps in cache_dumps/ yet")
            return
        name = st.selectbox("dump", names, key="probe_dump", help="folders in cache_dumps/")
        if st.button("Open dump", key="probe_open_btn", help="load it as the current trace"):
            _open(name)


def _recent_section() -> None:
    recent = state.recent_dumps()
    if not recent:
        return
    with st.expander(f"Recent traces ({len(recent)}, saved automatically in cache_dumps/)"):
        labels = {
            r["name"]: f"{r['created']}  {r['model']}, {r['tokens']} tokens: {r['prompt']}"
            for r in recent
        }
        name = st.selectbox(
            "trace",
            list(labels),
            format_func=labels.get,
            key="recent_pick",
            help="every probe is saved here; the newest few are kept",
        )
        if st.button("Reopen", key="recent_open_btn", help="load it as the current trace"):
            _open(name)


def _open(name: str) -> None:
    """Open a dump as the current trace; a probe still running is stopped, so it cannot
    replace the trace the user chose after it started."""
    background.cancel("probe")
    state.guarded(lambda: state.open_dump(name))


def _current_trace() -> None:
    trace = state.trace()
    if trace is None:
        return
    st.subheader("Current trace")
    m = trace.model
    st.text(
        f"{m.model_id}: {trace.n_tokens} tokens ({trace.n_prompt_tokens} prompt + "
        f"{trace.n_tokens - trace.n_prompt_tokens} generated), {m.n_layers} layers, "
        f"{m.n_heads} heads / {m.n_kv_heads} KV heads, head_dim {m.head_dim}"
    )
    task = state.task()
    if task is not None:
        parts = needle.describe(task, trace)
        st.markdown(f"**Needle task ({task.kind})**")
        st.text(f"needle:   {parts['needle']}")
        st.text(f"question: {parts['question']}")
        st.text(f"expected: {parts['expected']}")
        if parts["answer"]:
            st.text(f"model:    {parts['answer']}")
            st.caption(f"score {parts['score']}: the fraction of expected answers in the output")
        else:
            st.caption("probe with 'generate tokens' > 0 to see the model's answer")
    elif trace.n_tokens > trace.n_prompt_tokens:
        st.caption("generated text")
        st.code(needle.generated_text(trace), language=None, wrap_lines=True)
    c1, c2 = st.columns([3, 1])
    name = c1.text_input(
        "save as (inside cache_dumps/)",
        key="save_name",
        placeholder="my-dump",
        help="a name of letters, digits, - and _; the dump opens with `kvlens` and here",
    )
    if c2.button("Save dump", key="save_dump_btn", help="write the trace under that name"):
        state.guarded(lambda: st.success(f"saved {trace.save(state.safe_dump_path(name))}"))


def render() -> None:
    st.title("Probe")
    _intro()
    _recent_section()
    source = st.radio(
        "input",
        ["prompt", "needle task", "saved dump"],
        horizontal=True,
        key="probe_source",
        help=HELP["source"],
    )
    if source == "saved dump":
        _open_section(source)
    else:
        choices = [m for m in EMBEDDED if EMBEDDED[m].installed()]
        c1, c2, c3 = st.columns([2, 1, 1])
        model_name = c1.selectbox(
            "model",
            choices + ["local path ..."],
            index=choices.index(DEFAULT_MODEL) if DEFAULT_MODEL in choices else 0,
            key="probe_model",
            help=HELP["model"],
        )
        if model_name == "local path ...":
            model_name = c1.text_input(
                "model folder or .gguf file", key="probe_model_path", help=HELP["model"]
            )
        attention = c2.selectbox(
            "attention",
            ["auto", "full", "stats", "none"],
            key="probe_attention",
            help=HELP["attention"],
        )
        generate = c3.number_input(
            "generate tokens", 0, 256, 0, key="probe_generate", help=HELP["generate"]
        )
        if source == "needle task":
            t1, t2, t3, t4 = st.columns(4)
            kind = t1.selectbox(
                "task", ["niah", "multikey", "vartrack"], key="task_kind", help=HELP["task"]
            )
            length = t2.number_input(
                "length (tokens)", 64, 8000, 512, step=64, key="task_length", help=HELP["length"]
            )
            depth = t3.slider("depth", 0.0, 1.0, 0.5, key="task_depth", help=HELP["depth"])
            seed = t4.number_input("seed", 0, 10_000, 0, key="task_seed", help=HELP["seed"])
        else:
            text = st.text_area(
                "prompt",
                height=160,
                key="probe_prompt",
                placeholder="Paste or type the text to run through the model",
                help="any text; long prompts get attention statistics instead of full maps",
            )
        if st.button(
            "Run probe",
            type="primary",
            key="probe_run",
            help="one forward pass (plus the generated tokens) recording attention and K/V; "
            "progress and Cancel show while it runs, the current trace stays until it ends",
        ):
            if source == "needle task":
                state.guarded(
                    lambda: _run_task(model_name, kind, length, depth, seed, attention, generate)
                )
            elif not (text or "").strip():
                st.error("type a prompt first (or try the example above)")
            else:
                state.guarded(lambda: _run_probe(model_name, text, attention, int(generate)))
    background.panel("probe", store_probe)
    _current_trace()
