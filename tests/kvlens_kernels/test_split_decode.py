"""The split combine shared by the decode kernels, in Triton's interpreter (split counts past
one chunk of loads, empty splits, a row with nothing to attend to); the CPU references'
batched per-head products."""

from __future__ import annotations

import pytest
import torch

from kvlens_kernels.split_decode import head_products
from tests.kvlens_kernels.interpreter import needs_triton, run_check


@needs_triton
def test_combine_weights_splits_by_their_log_sum_exp_across_chunks():
    assert "ok: 4 cases" in run_check("split_decode_check.py")


@pytest.mark.parametrize(
    "m, n, d",
    [(3, 1, 64), (3, 2, 64), (3, 3, 64), (3, 131, 64), (3, 497, 64), (1, 6, 64), (1, 40, 64)]
    + [(4, 2, 256), (4, 497, 256)],
)
def test_head_products_are_each_heads_own_product_bit_for_bit(m, n, d):
    """SmolLM2's shapes (3 query heads per KV head, head dim 64; 1 row: the last query's
    row at prefill) and Gemma 3's (4, 256): one batched product for all heads gives per
    head exactly what ``a[h] @ b[h]`` gives, also under 400 multiply-adds a product (which
    ``torch.bmm`` computes with its own loop)."""
    torch.manual_seed(m * n)
    a, b = torch.randn(3, m, d) * 2, torch.randn(3, n, d).transpose(1, 2) * 3
    got = head_products(a, b)
    for h in range(3):
        assert torch.equal(got[h], a[h] @ b[h])


@pytest.mark.parametrize("m", [5, 6, 7, 9, 10, 11])
def test_head_products_elsewhere_round_within_float32(m):
    """Other group sizes: MKL's batched product picks another kernel by shape, so a product
    may round otherwise than the single one, never by more than float32 rounding of a
    64-term sum."""
    torch.manual_seed(m)
    a, b = torch.randn(3, m, 64) * 2, torch.randn(3, 497, 64).transpose(1, 2) * 3
    got = head_products(a, b)
    want = torch.stack([a[h] @ b[h] for h in range(3)])
    torch.testing.assert_close(got, want, rtol=0, atol=64 * 2**-24 * float(want.abs().max()))
