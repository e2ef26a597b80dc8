"""The HTML report's Sparse attention and Chunk reuse sections, from real runs on SmolLM2:
present exactly when their results are given, every run named, every head heatmap drawn,
task text escaped."""

from __future__ import annotations

import pytest
import torch

from app.jobs import reuse_result, sparse_result
from app.report import build_report
from probes import capture
from tests.conftest import passage


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: much faster on a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def results(smol, one_thread):
    model, tok = smol
    ids = tok(passage(2))["input_ids"]
    sparse = sparse_result(
        model, tok, ids, ["oracle:budget=32", "quest:budget=32,page=8"], max_new_tokens=3
    )
    settings = {"kind": "rag", "chunks": 3, "chunk_tokens": 40, "seed": 1}
    reuse = reuse_result(
        model, tok, settings, ["full", "naive", "cacheblend:recompute=0.5"], max_new_tokens=3
    )
    trace = capture(model, tok, "A short prompt.", attention="stats")
    return trace, sparse, reuse


def test_sections_appear_only_with_their_results(results):
    trace, sparse, reuse = results
    plain = build_report(trace)
    assert "<h2>Sparse attention</h2>" not in plain and "<h2>Chunk reuse</h2>" not in plain
    html = build_report(trace, sparse=sparse, reuse=reuse)
    assert "<h2>Sparse attention</h2>" in html and "<h2>Chunk reuse</h2>" in html
    assert html.index("<h2>Sparse attention</h2>") < html.index("<h2>Chunk reuse</h2>")


def test_sparse_section_names_every_run_and_draws_a_heatmap_per_method(results):
    trace, sparse, _ = results
    section = build_report(trace, sparse=sparse).split("<h2>Sparse attention</h2>")[1]
    for spec in sparse["reads"]:
        assert f"<td>{spec}</td>" in section
        assert f"{spec}: mean recall per head" in section
    assert f"{sparse['full_bytes']:,}" in section


def test_reuse_section_lists_each_run_and_its_deviation_per_layer(results):
    trace, _, reuse = results
    section = build_report(trace, reuse=reuse).split("<h2>Chunk reuse</h2>")[1]
    for r in reuse["results"]:
        assert f"<td>{r['spec']}</td>" in section
    for spec in reuse["summary"]:
        assert f"{spec}: deviation per layer" in section
    assert "full: deviation per layer" not in section  # the reference has no deviation


def test_reuse_task_text_is_escaped(results):
    trace, _, reuse = results
    hostile = dict(reuse, answer="<script>alert(1)</script>")
    html = build_report(trace, reuse=hostile)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
