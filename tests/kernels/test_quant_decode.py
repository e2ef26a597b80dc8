"""Quantised decode reference: equal to attention over the dequantised cache computed the
methods' way (methods.quant.dequantize), including the residual and several KV heads; and the
GPU kernel's PTX unpacking constants, emulated on the CPU."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kernels.quant_decode import QuantKV, _field_asm, dequantize_cache, quant_decode
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


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_ptx_unpacking_constants_give_every_code_exactly(bits):
    """The GPU turns field p of a 16-bit word into float16 by (w >> shift) & mask | 0x6400
    (1024 + 2^pos * code), then one fma with the two float16 constants written into the PTX.
    Emulated here for every code of every field, with the fma's single rounding."""
    for p in range(16 // bits):
        asm = _field_asm(bits, p)
        shifted = re.search(r"shr\.b32 t, t, (\d+);", asm)
        shift = int(shifted.group(1)) if shifted else 0
        mask, lut = re.search(
            r"lop3\.b32 t, t, (0x[0-9a-f]+), 0x64006400, (0x[0-9a-f]+);", asm
        ).groups()
        assert lut == "0xea"  # (a & b) | c
        low = int(mask, 16) & 0xFFFF
        pos = (low & -low).bit_length() - 1
        assert low == (2**bits - 1) << pos and pos + bits <= 10  # inside the float16 mantissa
        assert shift + pos == p * bits  # the mask sits on field p after the shift
        m, c = (int(x, 16) for x in re.findall(r"mov\.b32 [mc], (0x[0-9a-f]+);", asm))
        as_f16 = lambda bits16: float(np.array([bits16], np.uint16).view(np.float16)[0])  # noqa: E731
        mul, add = as_f16(m & 0xFFFF), as_f16(c & 0xFFFF)
        assert m >> 16 == m & 0xFFFF and c >> 16 == c & 0xFFFF  # both halves alike
        for code in range(2**bits):
            word = code << (p * bits) | (0xFFFF ^ ((2**bits - 1) << (p * bits)))  # other bits set
            t = ((word >> shift) & int(mask, 16) & 0xFFFF) | 0x6400
            exact = as_f16(t) * mul + add  # exact in float64; float16 rounds it once
            assert float(np.float16(exact)) == code, (bits, p, code)
