"""Report page: export the current trace (and the last comparison) as one HTML file."""

from __future__ import annotations

import streamlit as st

from app import state


def render() -> None:
    st.title("Report")
    trace = state.require_trace()
    st.write(
        "One self-contained HTML file: prompt, model facts, every analysis figure and table, "
        "and the last comparison. It opens offline."
    )
    if st.button("Build report", type="primary", key="report_build"):

        def build():
            from app.report import build_report

            with st.spinner("building the report ..."):
                st.session_state["report_html"] = build_report(
                    trace, st.session_state.get("comparison")
                )

        state.guarded(build)
    if "report_html" in st.session_state:
        st.download_button(
            "Download report.html",
            st.session_state["report_html"],
            file_name="kvlens-report.html",
            mime="text/html",
            key="report_download",
        )
