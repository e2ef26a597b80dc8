"""The Sparse attention page with a real SmolLM2 trace, through streamlit's AppTest: a run
draws the recall curve, the clickable head heatmap, the per-step recall and the X-ray strip,
every control has help, and a result never outlives its trace."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from probes import capture
from tests.conftest import passage

PAGE = "from pages import sparse_attention\nsparse_attention.render()\n"


@pytest.fixture(scope="module")
def trace(smol):
    model, tok = smol
    return capture(model, tok, passage(1), attention="none", kv=False)


def _widgets(at: AppTest) -> list:
    return [
        *at.number_input,
        *at.selectbox,
        *at.multiselect,
        *at.slider,
        *at.text_input,
        *at.button,
    ]


def _charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def test_a_run_draws_every_view_and_each_control_explains_itself(trace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_string(PAGE, default_timeout=300)
    at.session_state["trace"], at.session_state["trace_id"] = trace, "t1"
    at.session_state["trace_label"] = "test"
    at.run()
    assert not at.exception and at.title[0].value == "Sparse attention"
    at.multiselect(key="sp_methods").set_value(["oracle", "quest"])
    at.text_input(key="sp_budgets").set_value("16,32")
    at.slider(key="sp_new").set_value(3)
    at.button(key="sp_run_btn").click().run()
    at.session_state["jobs"]["sparse"].thread.join(600)
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    titles = [c["layout"]["title"]["text"] for c in _charts(at)]
    assert titles[0] == "attention recall against tokens read"
    assert any("mean recall per head" in t for t in titles)
    assert any("recall per step" in t for t in titles)
    assert any("positions read per step" in t for t in titles)
    assert len(at.caption) >= 5
    assert [w.label for w in _widgets(at) if not w.help] == []
    # the head chosen by number (as a click on the heatmap sets it) moves the per-step views
    at.number_input(key="sp_head_layer").set_value(7).run()
    assert any(
        t.startswith("layer 7, head 0") for t in [c["layout"]["title"]["text"] for c in _charts(at)]
    )
    # a new trace: the old result is never shown
    at.session_state["trace_id"] = "t2"
    at.run()
    assert any("choose methods and budgets" in i.value for i in at.info)


def test_every_sparse_method_is_chosen_at_first_and_explained(trace, tmp_path, monkeypatch):
    from methods.registry import available

    monkeypatch.chdir(tmp_path)
    at = AppTest.from_string(PAGE, default_timeout=60)
    at.session_state["trace"], at.session_state["trace_id"] = trace, "t1"
    at.session_state["trace_label"] = "test"
    at.run()
    chooser = at.multiselect(key="sp_methods")
    sparse = {n for n, cls in available().items() if cls.family == "sparse"}
    assert set(chooser.value) == sparse
    assert chooser.value[0] == "oracle" and chooser.value[-1] == "random_pages"
    assert all(f"{n}: " in chooser.help for n in sparse)
