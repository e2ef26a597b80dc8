"""The Triton statistics kernels in Triton's CPU interpreter, against the reference."""

from __future__ import annotations

from tests.kvlens_kernels.interpreter import needs_triton, run_check


@needs_triton
def test_kernels_match_reference_in_the_interpreter():
    assert "ok: 5 cases" in run_check("triton_interpreter_check.py")
