"""Quest's page bound: never below the best score of a page (random keys), tight for a page
of one key, and the Triton kernel in the interpreter against the reference."""

from __future__ import annotations

import torch

from kvlens_kernels.page_bounds import page_bounds
from tests.kvlens_kernels.interpreter import needs_triton, run_check


def test_the_bound_never_underestimates_a_pages_best_score():
    torch.manual_seed(0)
    page, n_pages, d = 16, 40, 32
    for trial in range(5):
        keys = torch.randn(3, n_pages * page, d) * (1 + trial)  # [Hkv, L, D]
        q = torch.randn(1, 6, d)  # two query heads per KV head
        grouped = keys.reshape(3, n_pages, page, d)
        bound = page_bounds(q, grouped.amin(2)[None], grouped.amax(2)[None], pool="max")[0]
        best = torch.einsum("hgd,hpkd->hgpk", q[0].reshape(3, 2, d), grouped).amax(-1)
        assert (bound >= best.amax(1) - 1e-4).all()  # the max pool bounds every head
        mean = page_bounds(q, grouped.amin(2)[None], grouped.amax(2)[None], pool="mean")[0]
        assert (mean >= best.mean(1) - 1e-4).all()


def test_a_page_of_one_key_is_bounded_exactly():
    torch.manual_seed(1)
    keys = torch.randn(2, 7, 16)
    q = torch.randn(1, 2, 16)
    bound = page_bounds(q, keys[None], keys[None])[0]
    torch.testing.assert_close(bound, torch.einsum("hd,hpd->hp", q[0], keys))


@needs_triton
def test_kernel_matches_reference_in_the_interpreter():
    assert "ok: 4 cases" in run_check("page_bounds_check.py")
