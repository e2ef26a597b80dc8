"""Compression lab: run methods live on the current prompt and compare them with the full cache,
then X-ray one method (which tokens each head kept, the attention mass it lost)."""

from __future__ import annotations

import dataclasses
import difflib
import html

import streamlit as st

from app import background, figures, lab_params, state
from methods.registry import available

BYTES_NOTE = "bytes as a 16-bit server holds them (codes at their bit width, scales in fp16)"


def _marked_diff(reference: str, text: str) -> str:
    """HTML of ``text`` with words that differ from ``reference`` highlighted (all escaped)."""
    ref, got = reference.split(), text.split()
    out = []
    for op, _a0, _a1, b0, b1 in difflib.SequenceMatcher(a=ref, b=got).get_opcodes():
        words = html.escape(" ".join(got[b0:b1]))
        if not words:
            continue
        out.append(
            words
            if op == "equal"
            else f'<mark style="background:{figures.EVICTED_BG}">{words}</mark>'
        )
    return " ".join(out) or "<i>(empty)</i>"


def _output_html(body: str) -> str:
    """A block of already-escaped output text; st.html never reads Markdown."""
    return (
        '<div class="kvlens-output" style="white-space:pre-wrap;font-family:monospace;'
        f'font-size:0.85rem;line-height:1.5">{body}</div>'
    )


def _method_widgets(name: str, index: int) -> tuple[str, dict]:
    cls = available()[name]
    params: dict = {}
    fields = dataclasses.fields(cls)
    cols = st.columns(max(1, len(fields)))
    for col, f in zip(cols, fields):
        key = f"lab_{index}_{name}_{f.name}"
        tip = lab_params.help_for(name, f.name)
        if isinstance(f.default, bool):
            value = col.checkbox(f.name, f.default, key=key, help=tip)
        elif lab_params.choices_for(name, f.name):
            options = list(lab_params.choices_for(name, f.name))
            index_ = options.index(f.default) if f.default in options else 0
            value = col.selectbox(f.name, options, index=index_, key=key, help=tip)
        elif isinstance(f.default, int):
            value = int(col.number_input(f.name, value=f.default, step=1, key=key, help=tip))
        elif isinstance(f.default, float):
            value = col.number_input(f.name, value=f.default, key=key, help=tip)
        else:
            value = col.text_input(f.name, str(f.default), key=key, help=tip)
        params[f.name] = value
    parts = [f"{k}={v}" for k, v in params.items()]
    return (f"{name}:{','.join(parts)}" if parts else name), params


def _score(expected: str):
    """The accuracy function: the task's own, else the fraction of expected strings found."""
    task = state.task()
    answers = [a.strip() for a in expected.split(",") if a.strip()]
    if task is not None:
        return task.score
    if not answers:
        return None

    def score(text: str) -> float:
        low = text.lower()
        return sum(a.lower() in low for a in answers) / len(answers)

    return score


def _run(trace, specs: list[str], max_new: int, expected: str) -> None:
    """Start the comparison as a background job (progress and Cancel in the page)."""
    from app.jobs import compare_forwards
    from methods.evaluate import compare

    model, tokenizer = state.model(st.session_state.get("model_name", "smollm2-135m"))
    task = state.task()
    score = _score(expected)
    prompt = trace.token_ids[: trace.n_prompt_tokens]
    cont = len(tokenizer(task.continuation, add_special_tokens=False)["input_ids"]) if task else 0
    forwards = compare_forwards(len(specs) - 1, max_new, cont)

    def work(job):
        done = {"n": 0}

        def progress(spec: str) -> None:
            done["n"] += 1
            job.say(f"running {spec} ({done['n']} of {len(specs)})")

        return compare(
            model,
            tokenizer,
            prompt,
            specs,
            max_new_tokens=max_new,
            score=score,
            continuation=task.continuation if task else None,
            progress=progress,
        ).to_json()

    background.start("lab", work, model, forwards * trace.model.n_layers)


def _store_comparison(result: dict) -> None:
    state.put("comparison", result)
    state.drop("xray")


def render() -> None:
    st.title("Compression lab")
    trace = state.require_trace()
    n_prompt = trace.n_prompt_tokens
    st.caption(
        f"Runs the current prompt ({n_prompt} tokens) with the full KV cache and with each "
        "method, live, through the compressed cache a server would hold."
    )
    names = list(available())
    chosen = st.multiselect(
        "methods",
        names,
        default=["streamingllm", "snapkv"],
        key="lab_methods",
        help="each runs against the full cache; combine with '+' from the command line",
    )
    specs, problems, notes = ["full"], [], []
    for i, name in enumerate(chosen):
        st.markdown(f"**{name}** ({available()[name].family}): {available()[name].summary}")
        spec, params = _method_widgets(name, i)
        specs.append(spec)
        try:
            notes += lab_params.check_against_trace(name, params, n_prompt)
        except Exception as exc:  # a KvlensError: one line, the run button is held back
            problems.append(str(exc))
    for note in notes:
        st.caption(note)
    c1, c2 = st.columns([1, 2])
    max_new = c1.slider(
        "new tokens",
        4,
        128,
        24,
        key="lab_new",
        help="tokens generated greedily by each run; KL is measured at each of them",
    )
    task = state.task()
    expected = ""
    if task is None:
        expected = c2.text_input(
            "expected answer (optional)",
            key="lab_expected",
            help="comma-separated strings a correct output contains; gives an accuracy column",
        )
    else:
        c2.text(f"expected answer (from the task): {', '.join(task.answers)}")
    for problem in problems:
        st.error(problem)
    if st.button(
        "Run comparison",
        type="primary",
        key="lab_run_btn",
        disabled=bool(problems),
        help="generates with the full cache and each method (seconds per method on CPU); "
        "progress and Cancel show while it runs, the page stays usable",
    ):
        state.guarded(lambda: _run(trace, specs, max_new, expected))
    if background.panel("lab", _store_comparison):
        st.caption("the rest of the page stays usable while this runs")
    comparison = state.result("comparison")
    if not comparison:
        return
    _show_comparison(comparison)
    _xray_section(trace, [r["spec"] for r in comparison["results"]], comparison)


def _show_comparison(comparison: dict) -> None:
    results = comparison["results"]
    full = next(r for r in results if r["spec"] == "full")
    max_new = comparison.get("settings", {}).get("max_new_tokens")
    st.subheader("Outputs")
    st.caption(
        "Each run's generated text, shown as text; words that differ from the full cache's "
        "are highlighted."
    )
    cols = st.columns(len(results))
    for col, r in zip(cols, results):
        with col:
            st.text(r["spec"])
            body = (
                html.escape(r["text"])
                if r["spec"] == "full"
                else _marked_diff(full["text"], r["text"])
            )
            st.html(_output_html(body))
            acc = "" if r["accuracy"] is None else f", accuracy {r['accuracy']:.2f}"
            st.caption(
                f"KL {r['kl_mean']:.4f}, top-1 {r['top1']:.2f}, "
                f"{100 * r['bytes_ratio']:.1f}% of full bytes{acc}"
            )
            n = len(r.get("token_ids") or [])
            if max_new and 0 < n < max_new:
                st.caption(
                    f"stopped after {n} tokens: the model wrote its end-of-turn token "
                    "(generation ends there)"
                )
    columns = ["spec", "kl_mean", "kl_max", "top1", "ppl", "accuracy", "bytes", "bytes_ratio"]
    columns.append("time_s")
    if all(r["accuracy"] is None for r in results):
        columns.remove("accuracy")
    st.dataframe([{k: r[k] for k in columns} for r in results], hide_index=True)
    st.caption(
        f"KL and top-1: next-token distributions vs the full cache; ppl: on the reference "
        f"continuation; {BYTES_NOTE}."
    )
    c1, c2 = st.columns(2)
    c1.plotly_chart(
        figures.kl_curves(results, "per-step KL vs the full cache (teacher forced)"), key="lab_kl"
    )
    c1.caption(
        "How far each method's next-token distribution is from the full cache's at each "
        "generated token, both fed the full cache's tokens (0 = identical). A spike is where "
        "the method lost something the model needed."
    )
    c2.plotly_chart(figures.memory_quality(results, "memory vs quality"), key="lab_mq")
    c2.caption(
        f"One point per run: further left holds fewer bytes, lower is closer to the full "
        f"cache; the best methods sit bottom left. {BYTES_NOTE[0].upper()}{BYTES_NOTE[1:]}."
    )
    methods = [r for r in results if r["kept_per_layer"]]
    if methods:
        pick = st.selectbox(
            "kept tokens of",
            [r["spec"] for r in methods],
            key="kept_pick",
            help="an eviction method's kept tokens per layer and KV head",
        )
        r = next(x for x in methods if x["spec"] == pick)
        st.plotly_chart(
            figures.kept_heatmap(r, "tokens kept per layer and KV head"), key="lab_kept_fig"
        )
        st.caption(
            "Prompt tokens each KV head holds after the prompt. Uniform methods keep the same "
            "count everywhere; PyramidKV shrinks it with depth, Ada-KV moves it between heads."
        )


def _token_strip(tokens: list[str], kept: set[int], limit: int = 1500) -> str:
    """The prompt as coloured spans: kept tokens blue, evicted orange (text escaped)."""
    spans = []
    for i, tok in enumerate(tokens[:limit]):
        kind, colour = ("kept", figures.KEPT_BG) if i in kept else ("evicted", figures.EVICTED_BG)
        spans.append(
            f'<span class="{kind}" title="{i}" style="background:{colour}">'
            f"{html.escape(tok)}</span>"
        )
    more = f" … ({len(tokens) - limit} more)" if len(tokens) > limit else ""
    return (
        '<div class="kvlens-strip" style="line-height:1.8;white-space:pre-wrap;'
        f'font-family:monospace;font-size:0.85rem">{"".join(spans)}{more}</div>'
    )


def _xray_section(trace, specs: list[str], comparison: dict) -> None:
    st.subheader("X-ray")
    st.caption(
        "For one method: which prompt tokens each head kept and evicted, the attention mass "
        "the model would have put on evicted tokens, and where its output first differs."
    )
    methods = [s for s in specs if s != "full"]
    if not methods:
        return
    spec = st.selectbox("X-ray of", methods, key="xray_spec", help="a method of the comparison")
    max_new = comparison.get("settings", {}).get("max_new_tokens") or 24
    if st.button(
        "Run X-ray",
        key="xray_run_btn",
        help="replays the method with the full cache's tokens and probes the full model "
        "(the full model's run is kept for the next method)",
    ):
        state.guarded(lambda: _run_xray(trace, spec, max_new))
    background.panel("xray", _store_xray)
    x = state.result("xray")
    if x is None:
        return
    _show_xray(trace, x)


def _run_xray(trace, spec: str, max_new: int) -> None:
    """Start the X-ray as a background job; the full model's run is computed once per trace
    and length, then shared by every method X-rayed."""
    from methods.xray import full_run, xray

    model, tokenizer = state.model(st.session_state.get("model_name", "smollm2-135m"))
    prompt = trace.token_ids[: trace.n_prompt_tokens]
    full = state.result("xray_full")
    if full is not None and len(full.reference) != max_new:
        full = None
    forwards = (0 if full else max_new) + 2 * max_new - 1

    def work(job):
        run = full
        if run is None:
            job.say("the full model's run, recording its attention")
            run = full_run(model, prompt, max_new)
        job.say(f"teacher-forcing {spec}")
        return xray(model, tokenizer, prompt, spec, max_new_tokens=max_new, full=run), run

    background.start("xray", work, model, forwards * trace.model.n_layers)


def _store_xray(result) -> None:
    x, full = result
    state.put("xray", x)
    state.put("xray_full", full)


def _show_xray(trace, x) -> None:
    import polars as pl

    if x.first_divergence is None:
        st.text(f"{x.spec} never diverged from the full cache.")
    else:
        st.text(
            f"{x.spec} first differs at generated token {x.first_divergence}; "
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
    st.caption(
        "Per query head, the share of the full model's attention that fell on tokens the "
        "method evicted, averaged over generated tokens; bright heads lose the most."
    )
    c1, c2 = st.columns(2)
    layer = c1.number_input(
        "layer", 0, trace.model.n_layers - 1, 0, key="xray_layer", help="layer to inspect"
    )
    kv_head = c2.number_input(
        "KV head",
        0,
        trace.model.n_kv_heads - 1,
        0,
        key="xray_head",
        help="eviction keeps tokens per KV head (shared by its query heads)",
    )
    row = x.kept.filter(step=0, layer=int(layer), kv_head=int(kv_head))
    kept = set(row["positions"][0].to_list()) if row.height else set()
    n = x.n_prompt
    st.caption(
        f"kept after prefill: {len(kept)} of {n} prompt tokens "
        "(blue kept, orange evicted; hover a token for its position)"
    )
    st.html(_token_strip(trace.tokens[:n], kept))
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
                "attention received by each token of this KV head",
                highlight=kept,
                highlight_colour=figures.KEPT,
                other_colour=figures.EVICTED,
                y_title="attention received (normalised)",
            ),
            key="xray_hh",
        )
        st.caption(
            "Attention each prompt token received in the full model (its heavy-hitter score, "
            "H2O); blue bars were kept, orange evicted. Tall orange bars are costly evictions."
        )
