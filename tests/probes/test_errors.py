"""The one-line rule for errors shown to a user (probes.errors.one_line)."""

from __future__ import annotations

from probes.errors import DumpError, KvlensError, one_line


def test_a_kvlens_error_is_its_own_message_on_one_line():
    assert one_line(KvlensError("bad\n  budget:   use >= 1")) == "bad budget: use >= 1"
    assert one_line(DumpError("no such folder")) == "no such folder"


def test_any_other_error_is_its_type_and_a_capped_single_line():
    text = one_line(ValueError("first line\nsecond\tline " + "x" * 400))
    assert text.startswith("ValueError: first line second line x")
    assert "\n" not in text and len(text) == len("ValueError: ") + 300
