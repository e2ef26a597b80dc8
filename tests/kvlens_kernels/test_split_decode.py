"""The split combine shared by the decode kernels, in Triton's interpreter (split counts past
one chunk of loads, empty splits, a row with nothing to attend to)."""

from __future__ import annotations

from tests.kvlens_kernels.interpreter import needs_triton, run_check


@needs_triton
def test_combine_weights_splits_by_their_log_sum_exp_across_chunks():
    assert "ok: 4 cases" in run_check("split_decode_check.py")
