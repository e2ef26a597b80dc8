"""Leaderboard page: accuracy vs bytes held per method, from sweep tables; start a small sweep
here (the grid of `kvlens sweep`) and see every saved table."""

from __future__ import annotations

import streamlit as st

from app import background, figures, state
from probes.models import DEFAULT_MODEL, EMBEDDED
from probes.tasks import TASK_KINDS

FOLDER_NAME = "sweeps"


def _sweep_form(folder) -> None:
    with st.expander("Start a small sweep", expanded=not any(folder.glob("*.parquet"))):
        models = [m for m in EMBEDDED if EMBEDDED[m].installed()] or [DEFAULT_MODEL]
        c1, c2 = st.columns(2)
        model = c1.selectbox("model", models, key="lb_model", help="an embedded model")
        tasks = c2.multiselect(
            "tasks",
            list(TASK_KINDS),
            default=["niah"],
            key="lb_tasks",
            help="synthetic tasks with a known answer, so accuracy can be measured",
        )
        methods = st.text_input(
            "methods",
            "snapkv:budget=64,streamingllm:budget=64",
            key="lb_methods",
            help="method specs separated by commas, as in the lab (the full cache always runs)",
        )
        c1, c2, c3, c4 = st.columns(4)
        length = c1.number_input(
            "length (tokens)", 64, 4096, 256, step=64, key="lb_length", help="prompt length"
        )
        seeds = c2.number_input(
            "examples", 1, 20, 2, key="lb_seeds", help="examples per task (different seeds)"
        )
        new = c3.number_input(
            "new tokens", 1, 64, 8, key="lb_new", help="tokens generated per example"
        )
        name = c4.text_input(
            "table name", "small", key="lb_name", help="saved as cache_dumps/sweeps/NAME.parquet"
        )
        st.caption(
            "The same from a shell: `kvlens sweep --models "
            f"{model} --methods {methods} --tasks {','.join(tasks)} --lengths {length} "
            f"--seeds {seeds} --max-new-tokens {new} --out cache_dumps/sweeps/{name}.parquet`"
        )
        if st.button(
            "Run sweep",
            key="lb_run_btn",
            help="rows already in the table are kept; rerun to resume. Progress and Cancel "
            "show while it runs; a cancelled sweep keeps the rows it finished",
        ):
            state.guarded(lambda: _start(model, tasks, methods, length, seeds, new, name))


def _start(model_name: str, tasks, methods: str, length, seeds, new, name: str) -> None:
    """Start the sweep as a background job (progress and Cancel in the page); it does not
    come from the current trace, so a new probe meanwhile leaves it running."""
    from app.jobs import sweep_forwards, sweep_grid
    from methods.sweep import sweep

    grid = sweep_grid(model_name, tasks, methods, length, seeds, new)
    out = state.safe_dump_path(FOLDER_NAME) / f"{state.safe_dump_path(name).name}.parquet"
    model, tokenizer = state.model(model_name)

    def work(job):
        def progress(done: int, total: int) -> None:
            job.say(f"{done} of {total} rows")

        sweep(grid, out, progress=progress)
        return out.name

    calls = sweep_forwards(grid, out, tokenizer) * model.config.num_hidden_layers
    background.start("sweep", work, model, calls, for_trace=False)


def _store(name: str) -> None:
    st.session_state["lb_file"] = name
    st.success(f"saved {name}")


def render() -> None:
    st.title("Leaderboard")
    folder = state.DUMPS / FOLDER_NAME
    _sweep_form(folder)
    background.panel("sweep", _store)  # outside the form's expander, which may fold meanwhile
    files = sorted(p.name for p in folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        st.info("no sweep tables yet in cache_dumps/sweeps/: start one above")
        return
    if st.session_state.get("lb_file") not in files:
        st.session_state.pop("lb_file", None)
    name = st.selectbox(
        "sweep table", files, key="lb_file", help="tables saved in cache_dumps/sweeps/"
    )

    def show():
        from methods.sweep import leaderboard, read_table

        board = leaderboard(read_table(folder / name))
        for (model, task, length), part in board.group_by(
            "model", "task", "length", maintain_order=True
        ):
            st.plotly_chart(
                figures.leaderboard(part, f"{model}, {task}, {length} tokens"),
                key=f"lb_{model}_{task}_{length}",
            )
            st.caption(
                "One point per method: left = fewer bytes held, up = more answers right; the "
                "dashed line is the full cache. Bytes as a 16-bit server holds them."
            )
        st.dataframe(board, hide_index=True)

    state.guarded(show)
