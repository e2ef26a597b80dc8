"""kvlens attention without a mask lets SDPA read each KV head for its query group
(``enable_gqa``) on the CPU as on CUDA, instead of copying the cache once per query head:
the numbers must be those of the repeated heads, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from probes.attention import _sdpa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv, group, d", [(3, 3, 64), (1, 4, 256), (2, 5, 128)])
@pytest.mark.parametrize("tq, tk", [(1, 1), (1, 7), (1, 497), (1, 1500), (64, 64), (530, 530)])
def test_unmasked_attention_equals_repeated_kv_heads_bit_for_bit(dtype, hkv, group, d, tq, tk):
    """SmolLM2's shape (3 KV heads of 3 query heads, head dim 64), Gemma 3's (1 of 4, 256)
    and another; decoding steps and causal prefills."""
    torch.manual_seed(tq + tk + group)
    q = torch.randn(1, hkv * group, tq, d, dtype=dtype)
    k, v = torch.randn(1, hkv, tk, d, dtype=dtype), torch.randn(1, hkv, tk, d, dtype=dtype)
    want = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(group, 1),
        v.repeat_interleave(group, 1),
        scale=d**-0.5,
        is_causal=tq == tk and tq > 1,
    )
    assert torch.equal(_sdpa(q, k, v, None, d**-0.5, 0.0), want)


def test_masked_attention_still_repeats_the_heads():
    """With a mask (queries at the end of a longer cache) the heads are repeated as before."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 9, 5, 64), torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    mask = torch.arange(40)[None, :] <= torch.arange(35, 40)[:, None]
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask, scale=0.125
    )
    assert torch.equal(_sdpa(q, k, v, None, 0.125, 0.0), want)
