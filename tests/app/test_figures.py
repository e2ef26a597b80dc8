"""Figures, task descriptions and lab parameter checks of the app, on real traces and tables."""

from __future__ import annotations

import json
import re

import plotly.io as pio
import polars as pl
import pytest

from probes import KvlensError, capture
from tests.conftest import passage


@pytest.fixture(scope="module")
def trace(smol):
    model, tok = smol
    return capture(model, tok, passage(1), attention="full")


@pytest.fixture
def streamlit_template():
    """Plotly's default template as inside the app's process (Streamlit installs its own)."""
    import streamlit.elements.plotly_chart  # noqa: F401  (sets plotly's default template)

    saved = pio.templates.default
    from streamlit.elements.lib.streamlit_plotly_theme import configure_streamlit_plotly_theme

    configure_streamlit_plotly_theme()
    assert pio.templates.default == "streamlit"
    yield
    pio.templates.default = saved


def _is_placeholder(colour: str) -> bool:
    """Streamlit's theme colours are stand-ins (#000001 ...) only its front end resolves."""
    return bool(re.fullmatch(r"#0000[0-9a-f]{2}", colour.lower()))


def _series_colours(fig) -> list[str]:
    out = []
    for t in fig.data:
        c = (t.line.color if t.type == "scatter" else None) or t.marker.color
        assert isinstance(c, str), f"{t.name} has no explicit colour"
        out.append(c)
    return out


def test_report_figures_keep_their_colours_in_the_app_process(trace, streamlit_template):
    """Issue 21, broken 4: built inside Streamlit, the report's series were all near-black."""
    from analysis import outliers
    from app import figures

    results = [{"spec": s, "kl_per_step": [0.0, 0.1 * i, 0.2 * i]} for i, s in enumerate("abc")]
    kl = figures.kl_curves(results, "kl")
    bars = figures.quant_error_bars(outliers.quantization_error(trace), "q")
    for fig in (kl, bars):
        colours = _series_colours(fig)
        assert len(set(colours)) == len(colours) > 1
        assert not any(_is_placeholder(c) for c in colours)
        layout = json.loads(fig.to_json())["layout"]
        way = layout["template"]["layout"].get("colorway", [])
        assert not any(_is_placeholder(c) for c in way)


def test_clickable_heatmap_has_a_selectable_point_on_every_cell(trace):
    from app import figures

    overview = trace.query_stats.group_by("layer", "head").agg(pl.col("entropy").mean())
    fig = figures.layer_head_heatmap(overview, "entropy", "t", clickable=True)
    heat, points = fig.data
    assert heat.type == "heatmap" and points.type == "scatter"
    cells = {(y, x) for y in heat.y for x in heat.x}
    assert set(zip(points.y, points.x)) == cells  # one point per (layer, head)
    assert fig.layout.clickmode == "event+select"
    assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.title.text == "head"


def test_needle_task_is_described_from_its_own_prompt(smol):
    from app.needle import describe, needle_sentences, question
    from probes.tasks import make_task

    _, tok = smol
    for kind in ("niah", "multikey", "vartrack"):
        task = make_task(kind, 128, tok, seed=3)
        sentences = needle_sentences(task)
        assert sentences and all(s in task.prompt for s in sentences)
        assert question(task).endswith("?") and question(task) in task.prompt
        if kind != "vartrack":
            key = task.settings["key"]
            assert any(key in s and task.answers[0] in s for s in sentences)
    model, tok = smol
    task = make_task("niah", 96, tok, seed=1)
    t = capture(model, tok, task.prompt, attention="stats", kv=False, generate=6)
    parts = describe(task, t)
    assert parts["answer"] == tok.decode(t.token_ids[t.n_prompt_tokens :])
    assert float(parts["score"]) == task.score(parts["answer"])


def test_lab_parameters_are_checked_against_each_other_and_the_prompt():
    from app.lab_params import check_against_trace

    with pytest.raises(KvlensError, match="window=100000 must be <= budget=16"):
        check_against_trace("snapkv", {"budget": 16, "window": 100000}, 500)
    with pytest.raises(KvlensError, match="sinks=16 must be < budget=16"):
        check_against_trace("streamingllm", {"budget": 16, "sinks": 16}, 500)
    assert check_against_trace("snapkv", {"budget": 64, "window": 8}, 500) == []
    notes = check_against_trace("kivi", {"residual": 128, "group": 32}, 60)
    assert notes and "residual=128" in notes[0]
    assert "nothing is evicted" in check_against_trace("h2o", {"budget": 128}, 60)[0]
