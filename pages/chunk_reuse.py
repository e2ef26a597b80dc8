"""Chunk reuse page (CacheBlend, Yao et al. 2025; Cache-Craft, Agarwal et al. 2025; KVCOMM,
Ye et al. 2025): chunk caches prefilled alone and reused on a generated RAG prompt; quality
against the recomputed share, where the reused keys/values deviate from a full prefill, and
which tokens each method recomputed."""

from __future__ import annotations

import polars as pl
import streamlit as st

from app import background, reuse_figures, state

METHODS = ["naive", "cacheblend", "cachecraft", "kvcomm"]
FRACTIONED = ("cacheblend", "cachecraft")  # methods run once per recompute fraction


def _specs(names: list[str], fractions: list[float]) -> list[str]:
    specs = ["full"]
    for name in names:
        if name in FRACTIONED:
            specs += [f"{name}:recompute={r}" for r in fractions]
        else:
            specs.append(name)
    return specs


def _run(settings: dict, specs: list[str], max_new: int) -> None:
    from app.jobs import reuse_result

    model, tokenizer = state.model(st.session_state.get("model_name", "smollm2-135m"))

    def work(job):
        done = {"n": 0}

        def progress(spec: str) -> None:
            done["n"] += 1
            job.say(f"running {spec} ({done['n']} of {len(specs)})")

        return reuse_result(
            model, tokenizer, settings, specs, max_new_tokens=max_new, progress=progress
        )

    # layer calls: per run a prefill or two and two decodes of max_new tokens; the anchors
    calls = (len(specs) * (2 + 2 * max_new) + 4) * model.config.get_text_config().num_hidden_layers
    background.start("reuse", work, model, calls)


def render() -> None:
    st.title("Chunk reuse")
    st.caption(
        "Retrieval-augmented prompts repeat the same document chunks at new positions. Each "
        "chunk's cache is prefilled alone (as an earlier request would have left it), its keys "
        "re-rotated to the new place and reused; methods differ in which tokens they recompute. "
        "The prompt is a generated multi-document question."
    )
    c1, c2, c3, c4 = st.columns(4)
    kind = c1.selectbox(
        "task",
        ["rag", "twohop"],
        key="cr_kind",
        help="rag: the answer is in one chunk; twohop: one chunk names the key another chunk "
        "holds the number of, so the answer needs cross-chunk attention naive reuse lacks",
    )
    chunks = c2.number_input(
        "chunks", 2, 8, 4, key="cr_chunks", help="document chunks in the prompt"
    )
    chunk_tokens = c3.number_input(
        "tokens per chunk", 32, 512, 64, step=16, key="cr_chunk_tokens",
        help="about this many tokens of filler prose per chunk, one fact in each",
    )  # fmt: skip
    seed = c4.number_input("seed", 0, 10_000, 0, key="cr_seed", help="task seed")
    names = st.multiselect(
        "methods",
        METHODS,
        default=METHODS,
        key="cr_methods",
        help="naive: reuse every chunk cache as is; cacheblend: recompute the tokens of highest "
        "KV deviation at an early layer; cachecraft: caches from an earlier request, fixed per "
        "chunk by prefix overlap and focus; kvcomm: caches shifted by anchor offsets",
    )
    c5, c6 = st.columns(2)
    fractions_text = c5.text_input(
        "recompute fractions",
        "0.05,0.15,0.3",
        key="cr_fractions",
        help="comma-separated shares of chunk tokens; CacheBlend and Cache-Craft run once per "
        "fraction, each a point of the quality curve",
    )
    max_new = c6.slider(
        "new tokens", 2, 16, 10, key="cr_new",
        help="tokens generated; the answer, a 7-digit number, takes about 8",
    )  # fmt: skip
    if st.button(
        "Run chunk reuse",
        type="primary",
        key="cr_run_btn",
        disabled=not names,
        help="the full prefill and every method on the same prompt; progress and Cancel show "
        "while it runs",
    ):

        def start() -> None:
            from methods.reuse import create_reuse
            from probes.errors import KvlensError
            from probes.rag_tasks import check_rag_settings

            try:
                fractions = [float(x) for x in fractions_text.split(",") if x.strip()]
            except ValueError:
                raise KvlensError("recompute fractions are comma-separated numbers") from None
            settings = {"kind": kind, "chunks": int(chunks),
                        "chunk_tokens": int(chunk_tokens), "seed": int(seed)}  # fmt: skip
            check_rag_settings(kind, settings["chunks"], settings["chunk_tokens"])
            specs = _specs(names, fractions)
            for spec in specs:
                create_reuse(spec)
            _run(settings, specs, int(max_new))

        state.guarded(start)
    background.panel("reuse", lambda result: state.put("reuse", result))
    result = state.result("reuse")
    if result is None:
        st.info("choose a task and methods, then run")
        return
    _show(result)


def _show(result: dict) -> None:
    s = result["settings"]
    st.caption(
        f"{s['kind']}: {s['chunks']} chunks of about {s['chunk_tokens']} tokens, seed "
        f"{s['seed']}; answer {result['answer']} (chunk "
        f"{' + '.join(map(str, result['answer_chunks']))})."
    )
    results = result["results"]
    c1, c2 = st.columns(2)
    c1.plotly_chart(
        reuse_figures.quality_curve(results, "kl_mean", "KL against the recomputed share"),
        key="cr_curve_kl",
    )
    c2.plotly_chart(
        reuse_figures.quality_curve(
            results, "top1", "top-1 agreement against the recomputed share"
        ),
        key="cr_curve_top1",
    )
    st.caption(
        "Each point is one method run: the share of chunk tokens it recomputed against the "
        "teacher-forced KL of its next-token distributions from the full prefill's (left) and "
        "how often its top token is the full prefill's (right). Hover for the FLOPs saved."
    )
    table = pl.DataFrame(results).select(
        "spec", "accuracy", "kl_mean", "top1", "recomputed", "flops_saved", "time_s", "text"
    )
    st.dataframe(table, hide_index=True)
    st.caption(
        "accuracy: the answer in the generated text; flops_saved: prefill FLOPs avoided against "
        "the full prefill (chunk caches come from earlier requests). Text is shown as text."
    )
    specs = list(result["kv"])
    spec = st.selectbox(
        "method for the views below",
        specs,
        key="cr_spec",
        help="the run whose deviation and recomputed tokens are shown",
    )
    c3, c4 = st.columns(2)
    column = c3.selectbox(
        "deviation",
        ["value_rel", "key_rel", "value_dev", "key_dev"],
        key="cr_measure",
        help="distance of the reused key or value from the full prefill's, over KV heads and "
        "channels; _rel divides by the full one's norm",
    )
    n_layers = int(result["kv"][spec]["layer"].max()) + 1
    layer = c4.slider(
        "layer", 0, n_layers - 1, min(n_layers - 1, n_layers // 2), key="cr_layer",
        help="the layer whose deviation colours the prompt",
    )  # fmt: skip
    kv = result["kv"][spec]
    row = kv.filter(layer=int(layer)).sort("position")
    picked = next((r for r in results if r["spec"] == spec), {})
    selected = set(picked.get("notes", {}).get("selected", []))
    n_ctx = row.height
    scores = row[column].to_list() + [0.0] * (len(result["tokens"]) - n_ctx)
    st.html(reuse_figures.prompt_html(result["tokens"], scores, result["segments"], selected))
    st.caption(
        f"The prompt at layer {layer}: orange as deep as the token's {column} (scaled to the "
        f"largest); outlined: the {len(selected)} tokens the method recomputed. Each chunk "
        "starts a line; the question (last line) is always computed."
    )
    st.plotly_chart(
        reuse_figures.deviation_heatmap(
            kv, column, f"{spec}: {column} per layer and position", result["starts"]
        ),
        key="cr_heatmap",
    )
    st.caption(
        "Where deviation concentrates: the first tokens of each chunk (they were a prompt's "
        "first tokens when cached alone) and the deeper layers."
    )
    st.plotly_chart(
        reuse_figures.layer_deviation(result["summary"][spec], f"{spec}: deviation per layer"),
        key="cr_layers",
    )
    st.caption(
        "Mean relative key/value deviation over chunk tokens per layer, and the total variation "
        "distance between the question's attention over the prompt with reuse and with the full "
        "prefill (mean over query heads and question tokens)."
    )
