"""The Chunk reuse page with the real SmolLM2, through streamlit's AppTest: a run draws the
quality curves, the prompt coloured by deviation with the recomputed tokens outlined, the
layer x position heatmap and the per-layer deviation; every control has help; bad input is
one line in the page; the prompt's text is escaped."""

from __future__ import annotations

import json

import pytest
import torch
from streamlit.testing.v1 import AppTest

PAGE = "from pages import chunk_reuse\nchunk_reuse.render()\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # short prompts on a shared CPU: one thread is faster
    yield
    torch.set_num_threads(before)


def _widgets(at: AppTest) -> list:
    return [*at.number_input, *at.selectbox, *at.multiselect, *at.slider, *at.text_input,
            *at.button]  # fmt: skip


def _titles(at: AppTest) -> list[str]:
    return [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]


def test_a_run_draws_every_view_and_each_control_explains_itself(smol):
    at = AppTest.from_string(PAGE, default_timeout=300)
    at.run()
    assert not at.exception and at.title[0].value == "Chunk reuse"
    assert any("choose a task and methods" in i.value for i in at.info)
    at.selectbox(key="cr_kind").set_value("twohop")
    at.number_input(key="cr_chunks").set_value(2)
    at.number_input(key="cr_chunk_tokens").set_value(32)
    at.multiselect(key="cr_methods").set_value(["naive", "cacheblend"])
    at.text_input(key="cr_fractions").set_value("0.2,1")
    at.slider(key="cr_new").set_value(2)
    at.button(key="cr_run_btn").click().run()
    at.session_state["jobs"]["reuse"].thread.join(600)
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    titles = _titles(at)
    assert titles[:2] == [
        "KL against the recomputed share",
        "top-1 agreement against the recomputed share",
    ]
    assert any("per layer and position" in t for t in titles)
    assert any("deviation per layer" in t for t in titles)
    assert [w.label for w in _widgets(at) if not w.help] == []
    result = state_result(at)
    specs = [r["spec"].split(",")[0] for r in result["results"]]
    assert specs == ["full", "naive", "cacheblend:recompute=0.2", "cacheblend:recompute=1.0"]
    # recomputing every token leaves no deviation; naive reuse deviates
    kv = result["kv"]
    blend_all = next(s for s in kv if s.startswith("cacheblend:recompute=1.0"))
    assert float(kv[blend_all]["value_rel"].max()) < 1e-3 < float(kv["naive"]["value_rel"].max())
    # the prompt view: one span per token, the recomputed ones outlined
    at.selectbox(key="cr_spec").set_value(next(s for s in kv if "recompute=0.2" in s)).run()
    prompt = next(h.proto.body for h in at.get("html"))
    assert prompt.count("<span") == len(result["tokens"])
    picked = next(r for r in result["results"] if "recompute=0.2" in r["spec"])
    assert prompt.count("outline:") == len(picked["notes"]["selected"]) > 0


def state_result(at: AppTest) -> dict:
    store = at.session_state["results"]
    return store["items"]["reuse"]


def test_bad_fractions_are_one_line_in_the_page():
    at = AppTest.from_string(PAGE, default_timeout=120)
    at.run()
    at.text_input(key="cr_fractions").set_value("0.2,lots").run()
    at.button(key="cr_run_btn").click().run()
    assert [e.value for e in at.error] == ["recompute fractions are comma-separated numbers"]
    at.text_input(key="cr_fractions").set_value("1.5").run()
    at.button(key="cr_run_btn").click().run()
    assert "recompute must be in [0, 1]" in at.error[0].value


def test_prompt_html_escapes_tokens():
    from app.reuse_figures import prompt_html

    out = prompt_html(["<b>", "&x"], [1.0, 0.0], [0, 0], {0})
    assert "<b>" not in out and "&lt;b&gt;" in out and "&amp;x" in out
    assert out.count("outline:") == 1


def test_the_app_lists_the_page():
    from pathlib import Path

    app = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"
    assert 'st.Page(chunk_reuse.render, title="Chunk reuse"' in app.read_text()
    at = AppTest.from_file(str(app), default_timeout=120)
    at.run()
    assert not at.exception
