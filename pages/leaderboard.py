"""Leaderboard page: accuracy vs bytes held per method, from a saved sweep table."""

from __future__ import annotations

import streamlit as st

from app import figures, state


def render() -> None:
    st.title("Leaderboard")
    folder = state.DUMPS / "sweeps"
    files = sorted(p.name for p in folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        st.info("no sweep tables yet: run `kvlens sweep ... --out cache_dumps/sweeps/NAME.parquet`")
        return
    name = st.selectbox("sweep table", files, key="lb_file")

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
        st.dataframe(board, hide_index=True)

    state.guarded(show)
