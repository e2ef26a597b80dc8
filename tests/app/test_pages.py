"""Every page renders with a small real trace (streamlit's AppTest, no browser)."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from probes import capture
from tests.conftest import passage

PAGES = [
    "probe",
    "attention",
    "heavy_hitters",
    "retrieval_heads",
    "outliers",
    "cross_layer",
    "compression_lab",
    "report",
]


@pytest.fixture(scope="module")
def trace(smol):
    model, tok = smol
    return capture(model, tok, passage(1), attention="full", generate=3)


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_error(page, trace):
    at = AppTest.from_string(f"from pages import {page}\n{page}.render()\n", default_timeout=120)
    at.session_state["trace"] = trace
    at.session_state["trace_label"] = "test"
    at.session_state["tables"] = {}
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value


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


def test_compression_lab_runs_a_comparison_and_an_xray(trace):
    at = AppTest.from_string(
        "from pages import compression_lab\ncompression_lab.render()\n", default_timeout=300
    )
    at.session_state["trace"] = trace
    at.session_state["tables"] = {}
    at.run()
    at.multiselect(key="lab_methods").set_value(["streamingllm"])
    at.run()
    at.number_input(key="lab_0_streamingllm_budget").set_value(24)
    at.slider(key="lab_new").set_value(4)
    at.button(key="lab_run").click().run()
    assert not at.exception and not at.error
    assert at.session_state["comparison"]["results"][1]["spec"] == "streamingllm:budget=24,sinks=4"
    at.button(key="xray_run").click().run()
    assert not at.exception and not at.error
    x = at.session_state["xray"]
    assert x.kept.filter(step=0)["n_kept"].max() == 24
    strips = [m.value for m in at.markdown if "kvlens-strip" in m.value]
    assert (
        strips and strips[0].count("#f7c5c5") == trace.n_prompt_tokens - 24
    )  # evicted tokens in red
