"""Issue 21, "any step over 2 s shows progress and can be cancelled": the probe, the retrieval
head detection, the head profile and a sweep started on the Leaderboard run as background jobs
(app.background), with live progress and a Cancel button; what they make is handed to the page
once, and Cancel keeps what was there before (AppTest, the real SmolLM2, short prompts)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from probes import capture
from tests.conftest import passage

APP = str(Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py")
RETRIEVAL = "from pages import retrieval_heads\nretrieval_heads.render()\n"
LEADERBOARD = "from pages import leaderboard\nleaderboard.render()\n"


@pytest.fixture(scope="module")
def trace(smol):
    model, tok = smol
    return capture(model, tok, passage(1), attention="full")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, so auto-saved dumps land in tmp_path/cache_dumps."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _job(at: AppTest, kind: str):
    return at.session_state["jobs"].get(kind) if "jobs" in at.session_state else None


def _with_trace(at: AppTest, trace, trace_id: str = "t1") -> AppTest:
    at.session_state["trace"] = trace
    at.session_state["trace_id"] = trace_id
    at.session_state["trace_label"] = "previous"
    return at


def _wait(job, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready(job) and not job.done and time.time() < deadline:
        time.sleep(0.05)


def _cancel(at: AppTest, kind: str) -> float:
    """Press the job's Cancel; returns how long the job ran on."""
    job = _job(at, kind)
    at.button(key=f"{kind}_cancel_btn").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("cancelled" in i.value for i in at.info)  # at once, before the run stops
    assert _job(at, kind) is None
    job.thread.join(120)
    assert job.cancelled and job.result is None, "the job ran to its end instead"
    at.run()
    assert not at.exception and not at.error
    return job.ended - job.started


def _probe_app(trace, generate: int, prompt: str = passage(1)) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    _with_trace(at, trace).run()
    assert at.sidebar.caption[0].value == "trace: previous"
    at.text_area(key="probe_prompt").input(prompt)
    at.number_input(key="probe_generate").set_value(generate).run()
    at.button(key="probe_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    return at


def test_a_probe_runs_as_a_job_and_cancel_keeps_the_previous_trace(trace, in_tmp):
    at = _probe_app(trace, generate=256)
    job = _job(at, "probe")
    assert job is not None and not job.done, "the probe ran inside the page script"
    assert at.get("progress") and at.button(key="probe_cancel_btn")
    # meanwhile the previous trace is still the current one, and still shown
    assert at.session_state["trace"] is trace and at.session_state["trace_id"] == "t1"
    assert any(s.value == "Current trace" for s in at.subheader)
    _wait(job, lambda j: j.calls >= 30)  # the prompt's forward done, generating now
    assert 0 < job.fraction() < 1
    stopped = _cancel(at, "probe")
    assert stopped < 60  # 256 new tokens would take minutes on two cores
    assert at.session_state["trace"] is trace and at.session_state["trace_id"] == "t1"
    assert at.sidebar.caption[0].value == "trace: previous"
    assert not any("probed" in s.value for s in at.success)
    assert not list((in_tmp / "cache_dumps").glob("recent-*"))  # nothing saved of it


def test_a_finished_probe_becomes_the_current_trace_once(trace, in_tmp):
    at = _probe_app(trace, generate=2)
    job = _job(at, "probe")
    assert job is not None
    assert at.sidebar.caption[0].value == "trace: previous"
    job.thread.join(120)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    new = at.session_state["trace"]
    new_id = at.session_state["trace_id"]
    assert new is not trace and new_id != "t1"
    assert new.n_tokens == new.n_prompt_tokens + 2
    assert at.sidebar.caption[0].value == f"trace: smollm2-135m, {new.n_tokens} tokens"
    assert [s.value for s in at.success if s.value.startswith("probed")] != []
    assert len(list((in_tmp / "cache_dumps").glob("recent-*"))) == 1
    assert at.session_state["results"]["trace_id"] == new_id  # the old trace's results gone
    at.run()  # handed over once: the next run neither makes another trace nor says it again
    assert at.session_state["trace_id"] == new_id and _job(at, "probe") is None
    assert not any(s.value.startswith("probed") for s in at.success)
    assert at.sidebar.caption[0].value == f"trace: smollm2-135m, {new.n_tokens} tokens"


def test_a_probe_that_ends_while_another_page_is_open_becomes_current_there(trace, in_tmp):
    at = _probe_app(trace, generate=2)
    job = _job(at, "probe")
    # AppTest's switch_page takes page files; kvlens' pages are functions: open by url path
    pages = {i["url_pathname"]: h for h, i in at._registered_pages.items()}
    at._page_hash = pages["attention"]
    at.run()
    assert at.title[0].value == "Attention" and _job(at, "probe") is job  # still running
    job.thread.join(120)
    at.run()  # the Attention page is open: the finished probe is handed over here
    assert not at.exception and not at.error, [e.value for e in at.error]
    new = at.session_state["trace"]
    assert new is not trace and at.session_state["trace_id"] != "t1"
    assert at.sidebar.caption[0].value == f"trace: smollm2-135m, {new.n_tokens} tokens"
    assert at.title[0].value == "Attention"
    assert _job(at, "probe") is None


def test_opening_a_dump_while_a_probe_runs_stops_the_probe(trace, in_tmp):
    at = _probe_app(trace, generate=2)  # a first probe, auto-saved as a recent dump
    _job(at, "probe").thread.join(120)
    at.run()
    saved = at.session_state["trace"]
    at.text_area(key="probe_prompt").input(passage(1))
    at.number_input(key="probe_generate").set_value(256).run()
    at.button(key="probe_run").click().run()
    job = _job(at, "probe")
    assert job is not None and not job.done
    at.button(key="recent_open_btn").click().run()  # the user opens the saved trace meanwhile
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert job.stop.is_set() and _job(at, "probe") is None
    job.thread.join(120)
    at.run()
    assert at.session_state["trace"].token_ids == saved.token_ids  # the dump stays current
    assert at.sidebar.caption[0].value.startswith("trace: dump recent-")


def test_a_failed_probe_says_why_in_one_line_and_keeps_the_trace(trace, in_tmp):
    at = _probe_app(trace, generate=0, prompt="word " * 9000)  # more than 8192 positions
    _job(at, "probe").thread.join(120)
    at.run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "the prompt has 9001 tokens but the model allows at most 8192; shorten it"
    ]
    assert at.session_state["trace"] is trace and at.session_state["trace_id"] == "t1"
    assert at.sidebar.caption[0].value == "trace: previous"


def _retrieval_page(trace, lengths: str, depths: str) -> AppTest:
    at = AppTest.from_string(RETRIEVAL, default_timeout=120)
    _with_trace(at, trace).run()
    at.text_input(key="rh_lengths").input(lengths)
    at.text_input(key="rh_depths").input(depths).run()
    return at


def test_the_retrieval_detection_runs_as_a_job_and_shows_its_scores(trace, in_tmp):
    at = _retrieval_page(trace, "64", "0.5")
    at.button(key="rh_run_btn").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    job = _job(at, "retrieval")
    assert job is not None and at.button(key="retrieval_cancel_btn")
    assert any("run the detection" in i.value for i in at.info)  # no scores yet
    job.thread.join(120)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    scores = at.session_state["retrieval"]["smollm2-135m"]
    assert scores.height == trace.model.n_layers * trace.model.n_heads
    assert "rh_map" in [c.key for c in at.get("plotly_chart")]
    assert not any("run the detection" in i.value for i in at.info)


def test_cancel_stops_the_detection_and_a_new_trace_drops_it(trace, in_tmp):
    at = _retrieval_page(trace, "512", "0.2,0.5,0.8")
    at.button(key="rh_run_btn").click().run()
    job = _job(at, "retrieval")
    _wait(job, lambda j: j.calls >= 1)
    assert _cancel(at, "retrieval") < 60
    assert "retrieval" not in at.session_state
    assert any("run the detection" in i.value for i in at.info)

    at.button(key="rh_run_btn").click().run()
    job = _job(at, "retrieval")
    at.session_state["trace_id"] = "t2"  # a new probe meanwhile: the job was for t1
    at.run()
    assert job.stop.is_set() and _job(at, "retrieval") is None
    job.thread.join(120)
    at.run()
    assert not at.exception and not at.error
    assert "retrieval" not in at.session_state  # never shown for t2
    assert not any("cancelled" in i.value for i in at.info)


def test_the_head_profile_runs_as_a_job_cancel_saves_nothing(trace, in_tmp):
    at = _retrieval_page(trace, "64", "0.5")
    profiles = in_tmp / "cache_dumps" / "profiles"
    at.button(key="hp_make_btn").click().run()
    job = _job(at, "profile")
    assert job is not None and at.get("progress") and at.button(key="profile_cancel_btn")
    _wait(job, lambda j: j.calls >= 1)
    assert _cancel(at, "profile") < 60
    assert not list(profiles.glob("*.parquet"))
    assert any("no profiles yet" in c.value for c in at.caption)

    at.button(key="hp_make_btn").click().run()
    _job(at, "profile").thread.join(120)
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [s.value for s in at.success] == ["saved smollm2-135m.parquet"]
    assert (profiles / "smollm2-135m.parquet").is_file()
    assert at.selectbox(key="hp_a").options == ["smollm2-135m.parquet"]


def test_a_sweep_runs_as_a_job_past_a_new_probe_and_cancel_keeps_its_rows(trace, in_tmp):
    from methods.sweep import read_table

    at = AppTest.from_string(LEADERBOARD, default_timeout=120)
    _with_trace(at, trace).run()
    at.text_input(key="lb_methods").input("streamingllm:budget=32")
    at.number_input(key="lb_length").set_value(64)
    at.number_input(key="lb_seeds").set_value(3)
    at.number_input(key="lb_new").set_value(8)
    at.text_input(key="lb_name").input("part").run()
    at.button(key="lb_run_btn").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    job = _job(at, "sweep")
    assert job is not None and at.get("progress") and at.button(key="sweep_cancel_btn")
    at.session_state["trace_id"] = "t2"  # a probe meanwhile: a sweep does not come from it
    at.run()
    assert _job(at, "sweep") is job and not job.stop.is_set()
    _wait(job, lambda j: j.text.startswith("2 of 6"), timeout=240)  # one example written
    assert job.text == "2 of 6 rows", job.text
    _cancel(at, "sweep")
    table = read_table(in_tmp / "cache_dumps" / "sweeps" / "part.parquet")
    assert 2 <= table.height < 6  # the finished example kept, the rest not run
    assert at.selectbox(key="lb_file").options == ["part.parquet"]
