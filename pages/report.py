"""Report page: export the current trace (and the last comparison) as one HTML file."""

from __future__ import annotations

import streamlit as st

from app import background, state


def render() -> None:
    st.title("Report")
    trace = state.require_trace()
    st.write(
        "One self-contained HTML file: prompt, model facts, every analysis figure and table, "
        "the retrieval heads if detected, the last comparison, sparse attention run and chunk "
        "reuse run. It opens offline."
    )
    if st.button(
        "Build report",
        type="primary",
        key="report_build_btn",
        help="runs every analysis on the current trace in the background (progress and "
        "Cancel below); seconds on short traces, a minute on long ones",
    ):
        retrieval = st.session_state.get("retrieval", {}).get(st.session_state.get("model_name"))
        comparison, sparse, reuse = (state.result(n) for n in ("comparison", "sparse", "reuse"))

        def work(job):
            from app.report import build_report

            return build_report(
                trace,
                comparison,
                retrieval=retrieval,
                sparse=sparse,
                reuse=reuse,
                progress=lambda name: job.say(f"building the report: {name}"),
            )

        state.drop("report_html")
        background.start("report", work)
    background.panel("report", lambda html: state.put("report_html", html))
    report_html = state.result("report_html")
    if report_html is not None:
        st.download_button(
            "Download report.html",
            report_html,
            file_name="kvlens-report.html",
            mime="text/html",
            key="report_download_btn",
            help="one HTML file with plotly embedded; opens offline",
        )
