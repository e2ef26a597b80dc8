"""Page-sparse decode: the reference against dense attention with a mask of the selected
pages' rows, and the Triton kernel in Triton's CPU interpreter against the reference."""

from __future__ import annotations

import torch

from kvlens_kernels.page_decode import page_decode, page_decode_reference, selected_rows
from tests.kvlens_kernels.interpreter import needs_triton, run_check


def test_reference_equals_dense_attention_masked_to_the_selected_pages():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 16), torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    lengths = torch.tensor([[40, 21, 33], [8, 40, 17]])
    page = 8
    pages = torch.tensor(
        [[[0, 4, 0], [1, 2, 0], [4, 0, 0]], [[0, 0, 0], [2, 3, 4], [0, 2, 0]]], dtype=torch.int32
    )
    n_pages = torch.tensor([[2, 2, 1], [1, 3, 2]])
    got = page_decode(q, k, v, lengths, pages, n_pages, page_size=page, scale=0.3)
    # the mask: row r of head (b, h) is read when its page is listed and r < length
    mask = torch.zeros(2, 3, 40, dtype=torch.bool)
    for b in range(2):
        for h in range(3):
            for p in pages[b, h, : n_pages[b, h]].tolist():
                mask[b, h, p * page : (p + 1) * page] = True
    mask &= torch.arange(40)[None, None, :] < lengths[..., None]
    kk, vv, mm = (t.repeat_interleave(2, 1) for t in (k, v, mask))
    s = torch.einsum("bhd,bhnd->bhn", q, kk) * 0.3
    want = torch.einsum("bhn,bhnd->bhd", s.masked_fill(~mm, float("-inf")).softmax(-1), vv)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_every_page_read_is_full_attention_and_an_empty_selection_is_zero():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    lengths = torch.tensor([[30, 30]])
    pages = torch.arange(4, dtype=torch.int32).expand(1, 2, 4)
    got = page_decode_reference(
        q, k, v, lengths, pages, torch.tensor([[4, 0]]), page_size=8, scale=0.25
    )
    p = torch.softmax(q[0, :2] @ k[0, 0].T * 0.25, -1)
    torch.testing.assert_close(got[0, :2], p @ v[0, 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0, 2:], torch.zeros(2, 16))
    assert selected_rows(torch.tensor([3]), 8, 30).tolist() == list(range(24, 30))


@needs_triton
def test_kernel_matches_reference_in_the_interpreter():
    assert "ok: 5 cases" in run_check("page_decode_check.py")
