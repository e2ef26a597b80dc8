"""Sparse decode over per-head compact caches: the reference against dense masked attention,
and the Triton kernel in Triton's CPU interpreter against the reference."""

from __future__ import annotations

import pytest
import torch

from kvlens_kernels.sparse_decode import sparse_decode, sparse_decode_reference
from kvlens_kernels.split_decode import attend_heads
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


def one_head(q, k, v, scale):
    """The reference's formula for one KV head before its heads were batched."""
    return torch.softmax(q.float() @ k.float().T * scale, dim=-1) @ v.float()


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize(
    "lengths",
    [[1, 1, 1], [2, 2, 2], [7, 7, 7], [130, 130, 130], [497, 497, 497], [497, 3, 64], [2, 1, 9]],
)
def test_reference_equals_one_head_at_a_time_bit_for_bit(group, lengths):
    """Heads of one length attend in one batched product (ragged heads one at a time): at
    SmolLM2's head dim the numbers are those of one product per head, exactly, including the
    tiny products that ``torch.bmm`` would compute with its own loop."""
    torch.manual_seed(sum(lengths) * group)
    hkv, d, cap = 3, 64, 520  # a capacity buffer, as the stores hold, past every length
    q = torch.randn(2, hkv * group, d) * 2
    k, v = torch.randn(2, hkv, cap, d) * 3, torch.randn(2, hkv, cap, d)
    got = sparse_decode_reference(q, k, v, torch.tensor([lengths, lengths[::-1]]), scale=0.125)
    for b, lens in enumerate([lengths, lengths[::-1]]):
        for h, n in enumerate(lens):
            rows = slice(h * group, (h + 1) * group)
            assert torch.equal(got[b, rows], one_head(q[b, rows], k[b, h, :n], v[b, h, :n], 0.125))
    if len(set(lengths)) == 1:
        n = lengths[0]
        batched = attend_heads(q[0].view(hkv, group, d), k[0, :, :n], v[0, :, :n], 0.125)
        assert torch.equal(batched.view(hkv * group, d), got[0])


@needs_triton
def test_kernel_matches_reference_in_the_interpreter():
    assert "ok: 4 cases" in run_check("sparse_decode_check.py")
