"""The app's pages with a real SmolLM2 trace, through streamlit's AppTest (no browser)."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from probes import capture
from tests.conftest import passage

APP = str(Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py")
PAGES = [
    "probe",
    "attention",
    "heavy_hitters",
    "retrieval_heads",
    "outliers",
    "cross_layer",
    "compression_lab",
    "leaderboard",
    "report",
]
# Several pages in one session, the way st.navigation runs them: keep_inputs first, then the
# page named in the session state.
SESSION = """
import streamlit as st
from app import state
from pages import attention, compression_lab, cross_layer, heavy_hitters, probe
state.keep_inputs()
with st.sidebar:
    state.compare_picker()
{
    "probe": probe.render,
    "attention": attention.render,
    "heavy": heavy_hitters.render,
    "lab": compression_lab.render,
    "cross": cross_layer.render,
}[st.session_state.get("page", "probe")]()
"""
# A prompt whose continuation by SmolLM2 is Markdown and HTML (headings, a code fence)
MARKDOWN_PROMPT = (
    "Write a Markdown document with a heading and a code block.\n\n# Title\n\n```html\n"
    "<h1>Hello</h1>\n```\n\n## Section two\n\n"
)


@pytest.fixture(scope="module")
def trace(smol):
    model, tok = smol
    return capture(model, tok, passage(1), attention="full", generate=3)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, so auto-saved dumps land in tmp_path/cache_dumps."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _finish(at: AppTest, kind: str) -> AppTest:
    """Wait for the page's background job (app.background), then draw its result (a page's
    tables may have been drawn in the run that started them: then there is none to wait for)."""
    job = at.session_state["jobs"].get(kind) if "jobs" in at.session_state else None
    if job is None:
        assert kind == "cl_tables", f"no {kind} job"
        return at
    job.thread.join(600)
    return at.run()


def _with_trace(at: AppTest, trace, trace_id: str = "test") -> AppTest:
    at.session_state["trace"] = trace
    at.session_state["trace_id"] = trace_id
    at.session_state["trace_label"] = "test"
    return at


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_error(page, trace, in_tmp):
    at = AppTest.from_string(f"from pages import {page}\n{page}.render()\n", default_timeout=120)
    _with_trace(at, trace).run()
    jobs = at.session_state["jobs"] if "jobs" in at.session_state else {}
    for job in list(jobs.values()):  # a page's first tables (app.background.tables)
        job.thread.join(300)
    if jobs:
        at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value
    assert [w.label for w in _widgets(at) if not w.help] == []  # every control explains itself


def test_pages_without_a_trace_say_so():
    at = AppTest.from_string(
        "from pages import heavy_hitters\nheavy_hitters.render()\n", default_timeout=60
    )
    at.run()
    assert not at.exception
    assert any("No trace yet" in i.value for i in at.info)


def test_dump_names_cannot_escape_the_dump_folder():
    from app.state import safe_dump_path
    from probes import KvlensError

    for bad in ("../x", "/etc", "..", ".hidden", "a/b", ""):
        with pytest.raises(KvlensError):
            safe_dump_path(bad)
    assert safe_dump_path("good-name_1").name == "good-name_1"


def _widgets(at: AppTest) -> list:
    return [
        *at.number_input,
        *at.selectbox,
        *at.multiselect,
        *at.slider,
        *at.text_input,
        *at.button,
        *at.radio,
        *at.text_area,
        *at.checkbox,
    ]


def test_every_control_has_help(trace, in_tmp):
    at = AppTest.from_string(SESSION, default_timeout=120)
    _with_trace(at, trace).run()
    at.radio(key="probe_source").set_value("needle task").run()
    probe_widgets = _widgets(at)
    at.session_state["page"] = "lab"
    at.run()
    at.multiselect(key="lab_methods").set_value(["snapkv", "kivi", "h2o"]).run()
    widgets = probe_widgets + _widgets(at)
    assert len(widgets) > 20
    assert [w.label for w in widgets if not w.help] == []
    # enumerations are selects, not free text
    assert at.selectbox(key="lab_0_snapkv_pooling").options == ["max", "avg"]
    assert at.selectbox(key="lab_2_h2o_schedule").value == "continuous"


def test_lab_refuses_a_window_the_budget_cannot_hold(trace, in_tmp):
    at = AppTest.from_string(SESSION, default_timeout=60)
    _with_trace(at, trace)
    at.session_state["page"] = "lab"
    at.run()
    at.multiselect(key="lab_methods").set_value(["snapkv"]).run()
    at.number_input(key="lab_0_snapkv_budget").set_value(16)
    at.number_input(key="lab_0_snapkv_window").set_value(100000).run()
    assert any("window=100000 must be <= budget=16" in e.value for e in at.error)
    assert at.button(key="lab_run_btn").disabled
    at.number_input(key="lab_0_snapkv_window").set_value(8).run()
    assert not at.error and not at.button(key="lab_run_btn").disabled


def test_lab_shows_output_as_text_and_never_a_previous_traces_result(smol, in_tmp):
    """Issue 21, broken 2 and 3: model text is never Markdown; results follow their trace."""
    model, tok = smol
    first = capture(model, tok, MARKDOWN_PROMPT, attention="full")
    at = AppTest.from_string(SESSION, default_timeout=300)
    _with_trace(at, first, "first")
    at.session_state["page"] = "lab"
    at.run()
    at.multiselect(key="lab_methods").set_value(["streamingllm"]).run()
    at.number_input(key="lab_0_streamingllm_budget").set_value(16)
    at.slider(key="lab_new").set_value(8)
    at.button(key="lab_run_btn").click().run()
    _finish(at, "lab")
    assert not at.exception and not at.error, [e.value for e in at.error]
    results = at.session_state["results"]["items"]["comparison"]["results"]
    texts = [r["text"] for r in results]
    assert any("```" in t or "#" in t or "</" in t for t in texts), texts  # markup to show
    markdown = " ".join(m.value for m in at.markdown)
    for text in texts:
        assert text.strip() not in markdown and html.escape(text).strip() not in markdown
    outputs = [h.value for h in at.html if "kvlens-output" in h.value]
    assert html.escape(texts[0]) in outputs[0]  # the full cache's text, escaped, no Markdown
    assert [t.value for t in at.text][:2] == ["full", results[1]["spec"]]

    at.button(key="xray_run_btn").click().run()
    _finish(at, "xray")
    assert not at.exception and not at.error
    strip = next(h.value for h in at.html if "kvlens-strip" in h.value)
    assert strip.count('class="evicted"') == first.n_prompt_tokens - 16
    assert any("kept after prefill: 16 of" in c.value for c in at.caption)
    at.session_state["page"] = "cross"
    at.run()
    _finish(at, "cl_tables")
    at.button(key="cl_umap_btn").click().run()
    _finish(at, "umap")
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 5  # cosine, adjacent, CKA, latent, UMAP

    # a new probe through the Probe page: nothing of the first trace may show
    at.session_state["page"] = "probe"
    at.run()
    at.radio(key="probe_source").set_value("prompt")
    at.text_area(key="probe_prompt").input(passage(1)).run()
    at.button(key="probe_run").click().run()
    _finish(at, "probe")
    assert not at.exception and not at.error
    second = at.session_state["trace"]
    assert second.n_tokens != first.n_tokens
    at.session_state["page"] = "cross"
    at.run()
    _finish(at, "cl_tables")  # the new trace's tables, not the first's
    assert len(at.get("plotly_chart")) == 4  # no UMAP of the first trace's keys
    at.session_state["page"] = "lab"
    at.run()
    assert not any(s.value == "Outputs" for s in at.subheader)
    at.slider(key="lab_new").set_value(4)
    at.button(key="lab_run_btn").click().run()
    _finish(at, "lab")
    assert not at.exception and not at.error
    assert any(s.value == "Outputs" for s in at.subheader)
    assert not any("kept after prefill" in c.value for c in at.caption)
    assert not [h for h in at.html if "kvlens-strip" in h.value]


def test_form_inputs_survive_a_page_switch(in_tmp):
    at = AppTest.from_string(SESSION, default_timeout=60)
    at.run()
    at.text_area(key="probe_prompt").input("a prompt worth keeping")
    at.number_input(key="probe_generate").set_value(7).run()
    at.session_state["page"] = "attention"  # draws none of the probe page's widgets
    at.run()
    assert any("No trace yet" in i.value for i in at.info)
    at.session_state["page"] = "probe"
    at.run()
    assert at.text_area(key="probe_prompt").value == "a prompt worth keeping"
    assert at.number_input(key="probe_generate").value == 7


def test_example_probe_labels_the_trace_at_once_and_survives_a_reload(in_tmp):
    """Issue 21, broken 5 (the sidebar label was one step late), and the one-click example:
    needle, question, expected and the model's answer shown; the trace reopens after a reload."""
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception
    assert at.sidebar.caption[0].value == "no trace yet"
    at.button(key="probe_example_btn").click().run()
    assert at.sidebar.caption[0].value == "no trace yet"  # the probe runs as a job
    _finish(at, "probe")
    assert not at.exception and not at.error, [e.value for e in at.error]
    trace = at.session_state["trace"]
    assert at.sidebar.caption[0].value == f"trace: smollm2-135m, {trace.n_tokens} tokens, niah"
    shown = {t.value.split(":", 1)[0].strip(): t.value.split(":", 1)[1] for t in at.text[1:]}
    task = at.session_state["results"]["items"]["task"]
    assert task.answers[0] in shown["needle"] and "special magic number" in shown["needle"]
    assert shown["question"].strip().endswith("?")
    assert shown["expected"].strip() == task.answers[0]
    generated = "".join(trace.tokens[trace.n_prompt_tokens :])
    assert trace.n_tokens > trace.n_prompt_tokens and shown["model"].strip() == generated.strip()
    saved = sorted((in_tmp / "cache_dumps").glob("recent-*"))
    assert len(saved) == 1

    reloaded = AppTest.from_file(APP, default_timeout=120)  # a new session: a reloaded tab
    reloaded.run()
    assert reloaded.sidebar.caption[0].value == "no trace yet"
    assert reloaded.selectbox(key="recent_pick").value == saved[0].name
    reloaded.button(key="recent_open_btn").click().run()
    assert not reloaded.exception and not reloaded.error
    again = reloaded.session_state["trace"]
    assert again.token_ids == trace.token_ids
    assert reloaded.sidebar.caption[0].value == f"trace: dump {saved[0].name}"
    assert any(t.value.startswith("needle:") for t in reloaded.text)  # the task came back too


def test_leaderboard_runs_a_small_sweep_and_lists_its_table(in_tmp):
    at = AppTest.from_string("from pages import leaderboard\nleaderboard.render()\n")
    at.default_timeout = 300
    at.run()
    assert any("no sweep tables yet" in i.value for i in at.info)
    at.text_input(key="lb_methods").input("streamingllm:budget=32")
    at.number_input(key="lb_length").set_value(64)
    at.number_input(key="lb_seeds").set_value(1)
    at.number_input(key="lb_new").set_value(2)
    at.text_input(key="lb_name").input("tiny").run()
    assert "--methods streamingllm:budget=32" in " ".join(c.value for c in at.caption)
    at.button(key="lb_run_btn").click().run()
    _finish(at, "sweep")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert (in_tmp / "cache_dumps" / "sweeps" / "tiny.parquet").is_file()
    assert at.selectbox(key="lb_file").value == "tiny.parquet"
    board = at.dataframe[0].value
    assert sorted(board["method"]) == ["full", "streamingllm:budget=32,sinks=4"]
    assert len(at.get("plotly_chart")) == 1


def test_a_saved_trace_is_shown_beside_the_current_one(smol, trace, in_tmp):
    """Two prompts side by side: the sidebar's 'compare with' loads a saved trace."""
    import json

    import polars as pl

    from analysis import heavy_hitters

    model, tok = smol
    other = capture(model, tok, "Seven ships sailed north. " * 6, attention="stats")
    other.save(in_tmp / "cache_dumps" / "ships")
    at = AppTest.from_string(SESSION, default_timeout=120)
    _with_trace(at, trace)
    at.session_state["page"] = "attention"
    at.run()
    at.selectbox(key="compare_pick").set_value("ships").run()
    assert not at.exception and not at.error
    charts = {c.key: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    assert (
        "attn_grid_second" in charts
        and "ships" in charts["attn_grid_second"]["layout"]["title"]["text"]
    )
    at.session_state["page"] = "heavy"
    at.run()
    assert not at.exception and not at.error
    charts = {c.key: json.loads(c.proto.spec) for c in at.get("plotly_chart")}
    sinks = heavy_hitters.sinks(other)
    want = sinks.filter(layer=3, head=2)["sink_mass"][0]
    z = charts["hh_sinks_second"]["data"][0]["z"]
    assert z[3][2] == pytest.approx(want)
    first = charts["hh_sinks"]["data"][0]["z"]
    assert first[3][2] == pytest.approx(
        heavy_hitters.sinks(trace).filter(layer=3, head=2)["sink_mass"][0]
    )
    assert first[3][2] != pytest.approx(want)
    bars = charts["hh_bar_second"]["data"][0]
    assert len(bars["x"]) == other.n_tokens
    assert isinstance(sinks, pl.DataFrame)
