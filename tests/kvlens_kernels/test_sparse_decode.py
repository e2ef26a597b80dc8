"""Sparse decode over per-head compact caches: the reference against dense masked attention,
and the Triton kernel in Triton's CPU interpreter against the reference."""

from __future__ import annotations

import torch

from kvlens_kernels.sparse_decode import sparse_decode, sparse_decode_reference
from tests.kvlens_kernels.interpreter import needs_triton, run_check


def test_reference_equals_dense_attention_with_a_length_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 16), torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 16)
    lengths = torch.tensor([[20, 5, 11], [1, 20, 7]])
    got = sparse_decode(q, k, v, lengths, scale=0.25)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    mask = torch.arange(20)[None, None, :] < lengths.repeat_interleave(2, 1)[..., None]
    s = torch.einsum("bhd,bhnd->bhn", q, kk) * 0.25
    want = torch.einsum("bhn,bhnd->bhd", s.masked_fill(~mask, float("-inf")).softmax(-1), vv)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        sparse_decode_reference(q, k, v, lengths, scale=0.25), want, atol=1e-5, rtol=1e-5
    )


@needs_triton
def test_kernel_matches_reference_in_the_interpreter():
    assert "ok: 4 cases" in run_check("sparse_decode_check.py")
