"""Retrieval heads page: run the needle detection and show retrieval / echo / induction scores."""

from __future__ import annotations

import polars as pl
import streamlit as st

from app import background, figures, state


def render() -> None:
    st.title("Retrieval heads")
    c1, c2, c3 = st.columns(3)
    lengths = c1.text_input(
        "needle lengths (tokens)",
        "256,512",
        key="rh_lengths",
        help="comma-separated haystack lengths; one needle prompt per length and depth",
    )
    depths = c2.text_input(
        "depths",
        "0.2,0.8",
        key="rh_depths",
        help="comma-separated needle depths in [0, 1] (0 = start of the text, 1 = end)",
    )
    seed = c3.number_input(
        "seed", 0, 1000, 0, key="rh_seed", help="another seed gives other filler and numbers"
    )
    model_name = st.session_state.get("model_name", "smollm2-135m")
    if st.button(
        "Detect retrieval heads",
        type="primary",
        key="rh_run_btn",
        help="probes one needle prompt per length and depth, then a repeated random sequence; "
        "progress and Cancel show while it runs",
    ):
        state.guarded(lambda: _detect(model_name, lengths, depths, int(seed)))
    background.panel("retrieval", _store_scores)
    scores = st.session_state.get("retrieval", {}).get(model_name)
    if scores is None:
        st.info(f"run the detection to see the scores of {model_name}")
    else:
        measure = st.radio(
            "score",
            ["retrieval", "echo", "induction"],
            horizontal=True,
            key="rh_measure",
            help="retrieval: copies from the needle (Wu et al., 2024); echo: attends to the "
            "earlier copy of the current token; induction: to the token after it",
        )
        others = [m for m in st.session_state.get("retrieval", {}) if m != model_name]
        other = None
        if others:
            other = st.selectbox(
                "beside it",
                ["(none)", *others],
                key="rh_other",
                help="another model whose scores were detected in this session",
            )
        left, right = st.columns(2) if other not in (None, "(none)") else (st.container(), None)
        left.plotly_chart(
            figures.layer_head_heatmap(scores, measure, f"{model_name}: {measure} score per head"),
            key="rh_map",
        )
        if right is not None:
            right.plotly_chart(
                figures.layer_head_heatmap(
                    st.session_state["retrieval"][other], measure, f"{other}: {measure}"
                ),
                key="rh_map_other",
            )
        st.caption(
            "Retrieval score (Wu et al., 2024): how often a head's strongest attention lands on "
            "the needle token the model is copying while it answers. Echo and induction "
            "scores on a repeated random sequence (RazorAttention, Tang et al., 2024). "
            "Bright heads are the ones head-aware methods (Razor, Duo) keep whole."
        )
        st.dataframe(scores.sort(measure, descending=True).head(10), hide_index=True)
    _profiles_section(lengths, depths, int(seed))


def _needles(lengths: str, depths: str) -> tuple[list[int], list[float]]:
    from probes.errors import KvlensError

    try:
        ls = [int(x) for x in lengths.split(",") if x.strip()]
        ds = [float(x) for x in depths.split(",") if x.strip()]
    except ValueError:
        raise KvlensError("lengths and depths are comma-separated numbers") from None
    if not ls or not ds:
        raise KvlensError("give at least one needle length and one depth")
    return ls, ds


def _detect(model_name: str, lengths: str, depths: str, seed: int) -> None:
    """Start the detection as a background job (progress and Cancel in the page)."""
    from app.jobs import find_retrieval_heads, retrieval_forwards

    ls, ds = _needles(lengths, depths)
    model, tokenizer = state.model(model_name)

    def work(job):
        scores = find_retrieval_heads(model, tokenizer, ls, ds, seed=seed, progress=job.say)
        return {"model": model_name, "scores": scores}

    calls = retrieval_forwards(len(ls) * len(ds)) * model.config.num_hidden_layers
    background.start("retrieval", work, model, calls)


def _store_scores(result: dict) -> None:
    """Scores describe the model, not one prompt: kept per model for this session, so two
    models can be shown side by side; the job itself is dropped if the trace changes."""
    st.session_state.setdefault("retrieval", {})[result["model"]] = result["scores"]


def _profile(model_name: str, lengths: str, depths: str, seed: int, path) -> None:
    """Start the head profile as a background job; it is written to ``path`` when done."""
    from app.jobs import head_profile, head_profile_forwards

    ls, ds = _needles(lengths, depths)
    model, tokenizer = state.model(model_name)

    def work(job):
        profile = head_profile(model, tokenizer, ls, ds, seed=seed, progress=job.say)
        job.say("saving the profile")
        profile.write_parquet(path)
        return path.name

    calls = head_profile_forwards(len(ls) * len(ds)) * model.config.num_hidden_layers
    background.start("profile", work, model, calls)


def _profiles_section(lengths: str, depths: str, seed: int) -> None:
    from analysis.head_profiles import MEASURES, compare_profiles, read_profile, type_shares

    st.header("Head profiles")
    folder = state.DUMPS / "profiles"
    model_name = st.session_state.get("model_name", "smollm2-135m")
    if st.button(
        f"Compute and save the profile of {model_name}",
        key="hp_make_btn",
        help="retrieval, echo/induction, sink, locality and entropy per head from the needle "
        "lengths, depths and seed above, saved in cache_dumps/profiles/ to compare models; "
        "progress and Cancel show while it runs",
    ):

        def make():
            folder.mkdir(parents=True, exist_ok=True)
            path = state.safe_dump_path("profiles") / f"{model_name.replace('/', '_')}.parquet"
            _profile(model_name, lengths, depths, seed, path)

        state.guarded(make)
    background.panel("profile", lambda name: st.success(f"saved {name}"))
    files = sorted(p.name for p in folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        st.caption(
            "no profiles yet: save one here, or with "
            "`kvlens heads --out cache_dumps/profiles/NAME.parquet`"
        )
        return
    c1, c2 = st.columns(2)
    a_name = c1.selectbox("profile A", files, key="hp_a", help="a saved head profile")
    b_name = c2.selectbox(
        "profile B",
        files,
        index=min(1, len(files) - 1),
        key="hp_b",
        help="another profile to compare with A",
    )

    def show():
        a, b = read_profile(folder / a_name), read_profile(folder / b_name)
        st.dataframe(type_shares(pl.concat([a, b], how="vertical_relaxed")), hide_index=True)
        measure = st.radio(
            "measure",
            list(MEASURES),
            horizontal=True,
            key="hp_measure",
            help="one of the profile's per-head measures",
        )
        left, right = st.columns(2)
        left.plotly_chart(
            figures.layer_head_heatmap(a, measure, f"{a['model'][0]}: {measure}"), key="hp_left"
        )
        right.plotly_chart(
            figures.layer_head_heatmap(b, measure, f"{b['model'][0]}: {measure}"), key="hp_right"
        )
        st.caption("The same measure per head for the two models, side by side.")
        st.dataframe(compare_profiles(a, b), hide_index=True)

    state.guarded(show)
