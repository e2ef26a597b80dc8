"""Sparse attention page: sparse methods on the current prompt, their attention recall against
the budget, per head, per step, and the positions each step read."""

from __future__ import annotations

import polars as pl
import streamlit as st

from app import background, figures, sparse_figures, state
from methods.registry import available

#: the ceiling first, the baseline last; every other sparse method between, in registry order
FIRST, LAST = "oracle", "random_pages"


def _ordered(names: list[str]) -> list[str]:
    middle = [n for n in names if n not in (FIRST, LAST)]
    return [n for n in (FIRST, *middle, LAST) if n in names]


def _run(trace, names: list[str], budgets: list[int], max_new: int) -> None:
    from app.jobs import sparse_result

    model, tokenizer = state.model(st.session_state.get("model_name", "smollm2-135m"))
    prompt = trace.token_ids[: trace.n_prompt_tokens]
    specs = [f"{name}:budget={b}" for name in names for b in budgets]
    task = state.task()

    def work(job):
        done = {"n": 0}

        def progress(spec: str) -> None:
            done["n"] += 1
            job.say(f"running {spec} ({done['n']} of {len(specs) + 1})")

        return sparse_result(
            model, tokenizer, prompt, specs, max_new_tokens=max_new,
            score=task.score if task else None, progress=progress,
        )  # fmt: skip

    calls = (len(specs) * 2 + 1) * max_new * trace.model.n_layers
    background.start("sparse", work, model, calls)


def render() -> None:
    st.title("Sparse attention")
    trace = state.require_trace()
    st.caption(
        "Methods that keep the whole cache and read only a selected part of it at each "
        f"decoding step, run live on the current prompt ({trace.n_prompt_tokens} tokens): how "
        "much of the true attention each selection holds, against how much it reads."
    )
    registry = available()
    sparse = _ordered([n for n, cls in registry.items() if cls.family == "sparse"])
    names = st.multiselect(
        "methods",
        sparse,
        default=sparse,
        key="sp_methods",
        help="every sparse method is chosen to start with; "
        + "; ".join(f"{n}: {registry[n].summary}" for n in sparse),
    )
    c1, c2 = st.columns(2)
    budgets_text = c1.text_input(
        "budgets (tokens read per KV head and step)",
        "16,32,64,128",
        key="sp_budgets",
        help="comma-separated; each method runs once per budget, giving one point of its "
        "recall-vs-read curve",
    )
    max_new = c2.slider(
        "new tokens",
        2,
        32,
        6,
        key="sp_new",
        help="decoding steps measured; every step of every layer and head is scored",
    )
    if st.button(
        "Run sparse attention",
        type="primary",
        key="sp_run_btn",
        disabled=not names,
        help="teacher-forces each method along the full cache's greedy tokens; progress and "
        "Cancel show while it runs",
    ):

        def start() -> None:
            from probes.errors import KvlensError

            try:
                budgets = [int(x) for x in budgets_text.split(",") if x.strip()]
            except ValueError:
                raise KvlensError("budgets are comma-separated whole numbers of tokens") from None
            if not budgets or min(budgets) < 1:
                raise KvlensError("give at least one budget of >= 1 token")
            _run(trace, names, budgets, int(max_new))

        state.guarded(start)
    background.panel("sparse", lambda result: state.put("sparse", result))
    result = state.result("sparse")
    if result is None:
        st.info("choose methods and budgets, then run")
        return
    _show(trace, result)


def _show(trace, result: dict) -> None:
    st.plotly_chart(
        sparse_figures.recall_vs_read(result["curve"], "attention recall against tokens read"),
        key="sparse_curve",
    )
    st.caption(
        "Each point is one method at one budget: the mean over layers, heads and steps of the "
        "attention mass its selection holds. Grey dashes: the oracle (each head's own top "
        "tokens) at the same number of tokens read, the ceiling of any selection that size."
    )
    runs = pl.DataFrame(result["runs"]).select(
        "spec", "tokens_read", "recall", "oracle_recall", "output_error", "kl_mean", "top1",
        "accuracy", "bytes_device", "bytes_host", "bytes_read_per_step",
    )  # fmt: skip
    st.dataframe(runs, hide_index=True)
    st.caption(
        f"Bytes as a 16-bit server holds them; the full cache holds {result['full_bytes']:,} "
        "and reads all of it at every step. bytes_read_per_step: what one decoding step reads "
        "(selection and rows, every layer). Full cache's text: "
        f"{result['full_text']!r}"
    )
    specs = list(result["reads"])
    spec = st.selectbox(
        "method for the views below",
        specs,
        key="sp_spec",
        help="the run whose per-head recall, per-step recall and positions read are shown",
    )
    table = result["table"].filter(method=spec)
    from analysis.sparse_recall import hard_heads, head_recall

    heads = head_recall(table, spec)
    event = st.plotly_chart(
        figures.layer_head_heatmap(
            heads, "recall", f"{spec}: mean recall per head", clickable=True
        ),
        key="sparse_heads",
        on_select="rerun",
        selection_mode="points",
    )
    st.caption(
        "Mean attention recall of each query head over the decoding steps (dark = the "
        "selection misses much of what the head attends to). Click a cell for its steps."
    )
    layer, head = state.head_selector("sp_head", trace.model.n_layers, trace.model.n_heads, event)
    one = table.filter(layer=layer, head=head)
    if one.height:
        st.plotly_chart(
            sparse_figures.step_recall(one, f"layer {layer}, head {head}: recall per step"),
            key="sparse_steps",
        )
        st.caption(
            "The head's recall at each decoding step beside the oracle's at the same read: a "
            "gap that opens at one step is a token the selection missed."
        )
    group = trace.model.n_heads // trace.model.n_kv_heads
    reads = result["reads"][spec].filter(layer=layer, kv_head=head // group)
    if reads.height:
        st.plotly_chart(
            sparse_figures.read_strip(
                reads, f"layer {layer}, KV head {head // group}: positions read per step"
            ),
            key="sparse_strip",
        )
        st.caption(
            "The X-ray strip: each row a decoding step, blue where the step read that position "
            "(the query heads of one KV head share what they read)."
        )
    threshold = st.slider(
        "hard-head threshold",
        0.0,
        1.0,
        0.5,
        key="sp_hard",
        help="a head is hard to sparsify when its mean recall stays below this under every "
        "method and budget run",
    )
    hard = hard_heads(result["table"], threshold)
    st.dataframe(hard, hide_index=True)
    st.caption(
        "Heads below the threshold under every method and budget, with their best method's "
        "recall and the oracle's: low oracle recall means the head spreads its attention "
        "(diffuse), high oracle but low method recall means the selection rule misses it."
    )
