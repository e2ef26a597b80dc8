"""The lab's parameter help: every registered method's parameters have help, and a method
whose parameter means something else than elsewhere gets its own text."""

from __future__ import annotations

import dataclasses

import pytest

from app.lab_params import HELP, check_against_trace, choices_for, help_for
from methods.registry import available
from probes.errors import KvlensError


def test_every_parameter_of_every_method_has_help():
    missing = [
        f"{name}.{f.name}"
        for name, cls in available().items()
        for f in dataclasses.fields(cls)
        if not help_for(name, f.name)
    ]
    assert not missing, missing


def test_a_method_s_own_help_overrides_the_shared_text():
    assert help_for("snapkv", "window") == HELP["window"]
    assert help_for("cskv", "window") != HELP["window"]
    assert "full precision" in help_for("cskv", "window")


def test_every_enumerated_default_is_among_the_choices_the_lab_offers():
    wrong = [
        f"{name}.{f.name}={f.default!r}"
        for name, cls in available().items()
        for f in dataclasses.fields(cls)
        if choices_for(name, f.name) and f.default not in choices_for(name, f.name)
    ]
    assert not wrong, wrong  # else the selectbox would offer another method's values


def test_a_window_longer_than_the_budget_is_refused_only_where_it_is_kept():
    with pytest.raises(KvlensError, match="window=64 must be <= budget=32"):
        check_against_trace("snapkv", {"budget": 32, "window": 64}, 500)
    # ActQKV's window counts the recent queries its probe is built from, not kept tokens
    assert check_against_trace("actqkv", {"budget": 8, "window": 16}, 500) == []
