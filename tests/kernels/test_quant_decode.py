"""Quantised decode reference: equal to attention over the dequantised cache computed the
methods' way (methods.quant.dequantize), including the residual and several KV heads."""

from __future__ import annotations

import torch

from kernels.quant_decode import QuantKV, dequantize_cache, quant_decode
from kernels.quantize import quantize_groups
from methods.quant import dequantize, quantize


def _cache(keys, values, residual_k, residual_v, bits, group):
    blocks = quantize_groups(
        keys, values, key_bits=bits, value_bits=bits, group=group, key_per_channel=True
    )
    return QuantKV.from_blocks(
        blocks, residual_k[None], residual_v[None],
        key_bits=bits, value_bits=bits, group=group, key_per_channel=True,
    )  # fmt: skip


def test_dequantised_cache_matches_the_methods_arithmetic():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 64, 32), torch.randn(2, 64, 32)
    cache = _cache(keys, values, torch.randn(2, 3, 32), torch.randn(2, 3, 32), 2, 16)
    k, v = dequantize_cache(cache, torch.float32)
    assert k.shape == (1, 2, 67, 32)
    want_k = dequantize(quantize(keys.view(2, 4, 16, 32), 2, dim=2)).view(2, 64, 32)
    want_v = dequantize(quantize(values, 2, dim=-1))
    torch.testing.assert_close(k[0, :, :64], want_k)
    torch.testing.assert_close(v[0, :, :64], want_v)
    assert torch.equal(k[0, :, 64:], cache.residual_keys[0])


def test_decode_equals_softmax_attention_over_the_dequantised_cache():
    torch.manual_seed(1)
    keys, values = torch.randn(2, 32, 32), torch.randn(2, 32, 32)
    cache = _cache(keys, values, torch.randn(2, 5, 32), torch.randn(2, 5, 32), 4, 16)
    q = torch.randn(1, 6, 32)
    k, v = dequantize_cache(cache, torch.float32)
    k, v = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=0.2)[:, :, 0]
    torch.testing.assert_close(quant_decode(q, cache, scale=0.2), want, atol=1e-5, rtol=1e-5)
