"""The departures the app shows as help text: one sentence for every analysis view, and each
module's docstring names its paper and points to its departure."""

from __future__ import annotations

import importlib

import pytest

from analysis.departures import DEPARTURES

PAPERS = {
    "heavy_hitters": ("H2O", "Scissorhands", "StreamingLLM"),
    "outliers": ("KIVI", "KVQuant"),
    "cross_layer": ("MiniCache", "CKA", "xKV", "UMAP"),
    "head_types": ("Wu et al.", "DuoAttention", "RazorAttention"),
    "head_profiles": ("Wu et al.",),
}


def test_every_view_has_one_sentence():
    assert set(DEPARTURES) == set(PAPERS)
    for view, text in DEPARTURES.items():
        assert text.endswith(".") and text.count(". ") == 0, view
        assert "\n" not in text and 80 < len(text) < 700, view


@pytest.mark.parametrize("view", sorted(PAPERS))
def test_module_docstring_names_its_paper_and_departure(view):
    doc = importlib.import_module(f"analysis.{view}").__doc__
    for paper in PAPERS[view]:
        assert paper in doc, (view, paper)
    assert "analysis.departures" in doc or "convention" in doc, view
