"""Every bad flag or parameter gives one line naming it; the app shows failures and stays up."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from tests.app.test_cli import run
from tests.conftest import passage


@pytest.mark.parametrize(
    "args, named",
    [
        (["probe", "--prompt", "x", "--out", "o", "--sinks", "-1"], "--sinks"),
        (["probe", "--prompt", "x", "--out", "o", "--window", "0"], "--window"),
        (["probe", "--prompt", "x", "--out", "o", "--generate", "-2"], "--generate"),
        (["probe", "--prompt", "x", "--out", "o", "--attention", "maps"], "--attention"),
        (["probe", "--prompt", "x", "--out", "o", "--layers", "a,b"], "--layers"),
        (["compare", "--task", "niah", "--depth", "1.5"], "--depth"),
        (["compare", "--task", "niah", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["compare", "--task", "niah", "--length", "10"], "length"),
        (["compare", "--prompt", "x", "--methods", "snapkv:window=-1"], "window"),
        (["app", "--port", "70000"], "--port"),
        (["retrieval-heads", "--depths", "2", "--out", "x.parquet"], "depths"),
        (["analyze", "/no/such/dump"], "no such folder"),
        (["report", "/no/such/dump", "--out", "r.html"], "no such folder"),
    ],
)
def test_bad_flags_give_one_line_naming_the_problem(tmp_path, args, named):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    lines = [
        line for line in result.stderr.strip().splitlines() if line.startswith("kvlens: error")
    ]
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_the_app_shows_a_refused_probe_and_stays_up(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the probe page auto-saves traces under ./cache_dumps
    at = AppTest.from_string("from pages import probe\nprobe.render()\n", default_timeout=300)
    at.run()
    at.text_area(key="probe_prompt").input(passage(125))  # about 8000 tokens
    at.selectbox(key="probe_attention").select("full")
    at.button(key="probe_run").click().run()
    _finish_probe(at)  # the probe runs as a background job: its refusal shows when it ends
    assert not at.exception
    assert any("GiB" in e.value and "--attention stats" in e.value for e in at.error)
    at.text_area(key="probe_prompt").input("A short prompt after the refusal.")
    at.selectbox(key="probe_attention").select("stats")
    at.button(key="probe_run").click().run()
    _finish_probe(at)
    assert not at.exception and any("probed" in s.value for s in at.success)


def _finish_probe(at) -> None:
    job = at.session_state["jobs"].get("probe") if "jobs" in at.session_state else None
    if job is not None:
        job.thread.join(300)
    at.run()
