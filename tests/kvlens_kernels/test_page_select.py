"""Quest's page selection (Tang et al. 2024): the reference picks torch.topk's set on distinct
bounds, the lowest indices among ties, every page when k >= N, the forced last page; the
Triton kernel equals it in Triton's CPU interpreter; the CPU dispatcher is the reference."""

from __future__ import annotations

import torch

from kvlens_kernels.page_select import page_select, page_select_reference
from methods.sparse.base import top_pages, top_with
from tests.kvlens_kernels.interpreter import needs_triton, run_check


def test_reference_is_topk_on_distinct_bounds_in_ascending_order():
    torch.manual_seed(0)
    bounds = torch.randn(2, 3, 200)
    for k in (1, 7, 199):
        got = page_select_reference(bounds, k)
        want = torch.topk(bounds, k, dim=-1).indices.sort(-1).values
        assert got.dtype == torch.int32 and torch.equal(got.long(), want)


def test_ties_take_the_lowest_indices_and_exactly_k():
    bounds = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 3.0]]])
    assert page_select_reference(bounds, 2).tolist() == [[[1, 2]]]
    assert page_select_reference(bounds, 5).tolist() == [[[1, 2, 3, 4, 6]]]
    assert page_select_reference(torch.zeros(1, 1, 9), 4).tolist() == [[[0, 1, 2, 3]]]
    signed_zero = torch.tensor([[[-0.0, 0.0, -0.0]]])  # equal values: by index
    assert page_select_reference(signed_zero, 2).tolist() == [[[0, 1]]]


def test_k_past_the_pages_takes_all_and_the_last_page_can_be_forced():
    bounds = torch.tensor([[[5.0, 4.0, 3.0, -9.0]]])
    assert page_select_reference(bounds, 4).tolist() == [[[0, 1, 2, 3]]]
    assert page_select_reference(bounds, 10).tolist() == [[[0, 1, 2, 3]]]
    assert page_select_reference(bounds, 1, force_last=True).tolist() == [[[3]]]
    assert page_select_reference(bounds, 2, force_last=True).tolist() == [[[0, 3]]]
    assert torch.equal(page_select(bounds, 2), page_select_reference(bounds, 2))  # CPU path


def test_top_pages_on_cpu_is_top_with_per_head():
    torch.manual_seed(1)
    scores = torch.randn(4, 50)
    last = torch.zeros(50, dtype=torch.bool)
    last[-1] = True
    for k in (1, 6, 50, 80):
        got = top_pages(scores, k, last=True)
        assert all(torch.equal(g, top_with(scores[h], k, last)) for h, g in enumerate(got))
        plain = top_pages(scores, k)
        assert all(torch.equal(g, top_with(scores[h], k)) for h, g in enumerate(plain))


@needs_triton
def test_kernel_matches_reference_in_the_interpreter():
    assert "ok: 112 checks" in run_check("page_select_check.py")
