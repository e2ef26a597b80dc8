"""Long work in the app runs as a background job: progress shows, Cancel stops it at the next
layer, and the rest of the app stays usable meanwhile (AppTest, the real SmolLM2)."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from probes import capture
from tests.conftest import passage

SESSION = """
import streamlit as st
from app import state
from pages import attention, compression_lab
state.keep_inputs()
pages = {"attention": attention.render, "lab": compression_lab.render}
pages[st.session_state.get("page", "lab")]()
"""


@pytest.fixture(scope="module")
def trace(smol):
    model, tok = smol
    return capture(model, tok, passage(2), attention="full")


@pytest.fixture
def lab(trace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_string(SESSION, default_timeout=120)
    at.session_state["trace"] = trace
    at.session_state["trace_id"] = "t1"
    at.session_state["trace_label"] = "test"
    at.run()
    at.multiselect(key="lab_methods").set_value(["streamingllm"]).run()
    at.number_input(key="lab_0_streamingllm_budget").set_value(16)
    return at


def _job(at, kind):
    return at.session_state["jobs"].get(kind) if "jobs" in at.session_state else None


def _wait_for_calls(job, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while job.calls < n and not job.done and time.time() < deadline:
        time.sleep(0.05)


def test_a_comparison_shows_progress_and_cancel_stops_it(lab):
    lab.slider(key="lab_new").set_value(128)
    lab.button(key="lab_run_btn").click().run()
    assert not lab.exception and not lab.error
    job = _job(lab, "lab")
    assert job is not None and not job.done
    assert lab.get("progress"), "a running comparison shows its progress"
    _wait_for_calls(job, 30)  # one forward of the 30 layers done
    assert 0 < job.fraction() < 1 and not job.done
    lab.button(key="lab_cancel_btn").click().run()
    assert not lab.exception and not lab.error
    assert any("cancelled" in i.value for i in lab.info)  # at once, before the run stops
    job.thread.join(60)
    stopped = job.ended - job.started
    assert job.cancelled and job.result is None  # stopped inside the model run
    lab.run()
    assert not lab.exception and not lab.error
    assert "comparison" not in lab.session_state["results"]["items"]
    assert not any(s.value == "Outputs" for s in lab.subheader)
    assert stopped < 60  # 128 new tokens x 2 runs would take minutes


def test_the_app_stays_usable_while_a_comparison_runs_and_its_result_arrives(lab):
    lab.slider(key="lab_new").set_value(24)
    lab.button(key="lab_run_btn").click().run()
    job = _job(lab, "lab")
    _wait_for_calls(job, 1)
    lab.session_state["page"] = "attention"
    t0 = time.perf_counter()
    lab.run()  # another page while the job runs: drawn at once, not after the job
    switch = time.perf_counter() - t0
    assert not lab.exception and not lab.error
    assert not job.done, "the job ended before the page switch could show anything"
    assert switch < job.seconds()
    lab.session_state["page"] = "lab"
    lab.run()
    job.thread.join(300)
    lab.run()
    assert not lab.exception and not lab.error
    assert any(s.value == "Outputs" for s in lab.subheader)
    comparison = lab.session_state["results"]["items"]["comparison"]
    assert [r["spec"] for r in comparison["results"]][0] == "full"
    assert _job(lab, "lab") is None  # handed over once


def test_a_job_of_an_older_trace_is_dropped_not_shown(lab, trace):
    lab.slider(key="lab_new").set_value(64)
    lab.button(key="lab_run_btn").click().run()
    job = _job(lab, "lab")
    lab.session_state["trace_id"] = "t2"  # a new probe meanwhile
    lab.run()
    assert job.stop.is_set() and _job(lab, "lab") is None
    job.thread.join(60)
    lab.run()
    assert "comparison" not in lab.session_state["results"]["items"]


def test_the_job_hooks_do_nothing_outside_a_job(smol):
    """The counting hooks sit on the shared model; other users' runs are untouched."""
    from app.background import install_hooks
    from methods.evaluate import compare

    model, tok = smol
    ids = tok(passage(1))["input_ids"]
    before = compare(model, tok, ids, "full", max_new_tokens=3).results[0]
    install_hooks(model)
    after = compare(model, tok, ids, "full", max_new_tokens=3).results[0]
    assert after.token_ids == before.token_ids and after.ppl == before.ppl


def test_a_umap_runs_in_the_background_and_cancel_drops_it(trace, tmp_path, monkeypatch):
    """Work that runs no model (UMAP) cannot be stopped midway: Cancel ends it for the page at
    once and its result is never shown."""
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_string("from pages import cross_layer\ncross_layer.render()\n")
    at.default_timeout = 120
    at.session_state["trace"] = trace
    at.session_state["trace_id"] = "t1"
    at.run()
    tables = _job(at, "cl_tables")  # None where the tables were drawn in that run
    if tables is not None:
        tables.thread.join(300)
        at.run()
    charts = len(at.get("plotly_chart"))
    at.button(key="cl_umap_btn").click().run()
    job = _job(at, "umap")
    assert job is not None and at.get("progress")
    if job.done:
        pytest.skip("the UMAP ended before Cancel could be pressed")
    at.button(key="umap_cancel_btn").click().run()
    if not job.stop.is_set():  # it ended between the check above and the click's rerun
        pytest.skip("the UMAP ended before Cancel could be pressed")
    assert any("cancelled" in i.value for i in at.info)
    job.thread.join(300)
    at.run()
    assert not at.exception and not at.error
    assert "umap" not in at.session_state["results"]["items"]
    assert len(at.get("plotly_chart")) == charts


def test_a_pages_tables_compute_in_a_job_with_progress_cancel_and_compute_again(
    trace, tmp_path, monkeypatch
):
    """The Cross-layer page's tables (seconds on a long trace) are a job: progress with one
    step per table, the figures once it ends, nothing of a cancelled run, a button to run it
    again, and the figures from the stored tables on a later visit without a new job."""
    from app import background

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(background, "QUICK_S", 0.0)  # never drawn in the run that starts it
    at = AppTest.from_string("from pages import cross_layer\ncross_layer.render()\n")
    at.default_timeout = 120
    at.session_state["trace"] = trace
    at.session_state["trace_id"] = "t1"
    at.run()
    job = _job(at, "cl_tables")
    assert job is not None and job.layer_calls == 4  # cosine, CKA, latent, post-RoPE latent
    assert at.get("progress") and not at.get("plotly_chart")
    job.stop.set()  # what the Cancel button does
    job.thread.join(300)
    at.run()
    assert any("cancelled" in i.value for i in at.info)
    at.run()
    assert _job(at, "cl_tables") is None and not at.get("plotly_chart")
    at.button(key="cl_tables_again_btn").click().run()
    _job(at, "cl_tables").thread.join(300)
    at.run()
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 4  # cosine, adjacent, CKA, latent
    at.run()
    assert _job(at, "cl_tables") is None and len(at.get("plotly_chart")) == 4


def test_the_report_builds_in_a_job_names_each_analysis_and_cancel_keeps_no_report(
    trace, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_string("from pages import report\nreport.render()\n", default_timeout=120)
    at.session_state["trace"] = trace
    at.session_state["trace_id"] = "t1"
    at.run()
    at.button(key="report_build_btn").click().run()
    job = _job(at, "report")
    assert job is not None and at.get("progress")
    job.stop.set()  # Cancel: the job stops before its next analysis
    job.thread.join(300)
    at.run()
    assert any("cancelled" in i.value for i in at.info)
    assert not at.get("download_button")
    at.button(key="report_build_btn").click().run()
    job = _job(at, "report")
    job.thread.join(300)
    assert job.text.startswith("building the report: ")  # the last analysis it named
    at.run()
    assert not at.exception and not at.error
    assert [b.label for b in at.get("download_button")] == ["Download report.html"]
    assert "<h1>kvlens report</h1>" in at.session_state["results"]["items"]["report_html"]


def test_tables_that_finish_quickly_draw_in_the_run_that_started_them(trace, tmp_path, monkeypatch):
    from app import background

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(background, "QUICK_S", 120.0)  # waits for the job, however slow here
    at = AppTest.from_string("from pages import cross_layer\ncross_layer.render()\n")
    at.default_timeout = 180
    at.session_state["trace"] = trace
    at.session_state["trace_id"] = "t1"
    at.run()
    assert not at.exception and not at.error
    assert _job(at, "cl_tables") is None and not at.get("progress")
    assert len(at.get("plotly_chart")) == 4  # cosine, adjacent, CKA, latent
