"""Quantised decode reference: equal to attention over the dequantised cache computed the
methods' way (methods.quant.dequantize), including the residual and several KV heads; and the
GPU kernel's PTX unpacking constants, emulated on the CPU."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kvlens_kernels.quant_decode import (
    HIGH_BYTES_ASM,
    SUBNORMAL_UNIT,
    QuantKV,
    _field_asm,
    dequantize_cache,
    field_from_high_bytes,
    field_position,
    field_scale,
    launch_defaults,
    quant_decode,
)
from kvlens_kernels.quantize import quantize_groups
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


def test_decode_reference_equals_one_head_at_a_time_bit_for_bit():
    """Every KV head of a quantised cache attends in one batched product: the numbers of one
    product per head over the dequantised cache, exactly."""
    torch.manual_seed(2)
    keys, values = torch.randn(3, 64, 64), torch.randn(3, 64, 64)
    cache = _cache(keys, values, torch.randn(3, 9, 64), torch.randn(3, 9, 64), 2, 32)
    q = torch.randn(1, 9, 64)
    k, v = dequantize_cache(cache, torch.float32)
    got = quant_decode(q, cache, scale=0.125)
    for h in range(3):
        p = torch.softmax(q[0, 3 * h : 3 * h + 3] @ k[0, h].T * 0.125, dim=-1)
        assert torch.equal(got[0, 3 * h : 3 * h + 3], p @ v[0, h])


def test_decode_equals_softmax_attention_over_the_dequantised_cache():
    torch.manual_seed(1)
    keys, values = torch.randn(2, 32, 32), torch.randn(2, 32, 32)
    cache = _cache(keys, values, torch.randn(2, 5, 32), torch.randn(2, 5, 32), 4, 16)
    q = torch.randn(1, 6, 32)
    k, v = dequantize_cache(cache, torch.float32)
    k, v = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=0.2)[:, :, 0]
    torch.testing.assert_close(quant_decode(q, cache, scale=0.2), want, atol=1e-5, rtol=1e-5)


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): output byte i is byte (selector nibble i) of {b, a}."""
    pool = a | b << 32
    return sum(((pool >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _high_bytes(pair: int) -> int:
    """HIGH_BYTES_ASM emulated on a 32-bit register holding two 16-bit words."""
    other, selector = re.fullmatch(
        r"prmt\.b32 \$0, \$1, (\d+), (0x[0-9a-f]+);", HIGH_BYTES_ASM
    ).groups()  # fmt: skip
    return _prmt(pair, int(other), int(selector, 16))


def test_the_high_bytes_permute_shifts_each_16_bit_word_down_by_8():
    for pair in (0x12345678, 0xFFFF0000, 0x0000FFFF, 0x80018002, 0xDEADBEEF):
        assert _high_bytes(pair) == ((pair >> 8) & 0xFF) | (((pair >> 24) & 0xFF) << 16)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_ptx_unpacking_gives_every_code_exactly(bits):
    """The GPU turns field p of a 16-bit word into a float16 by one AND of the word (or, for
    fields past the float16 mantissa, of its high byte) with the mask in the PTX: a subnormal
    worth code * 2^(position - 24); times 2^24 * field_scale it is the code. Emulated here for
    every code of every field, reading the 16 bits as IEEE float16."""
    for p in range(16 // bits):
        high = field_from_high_bytes(bits, p)
        assert high == (p * bits + bits > 10)  # the permute serves exactly these fields
        asm = _field_asm(bits, field_position(bits, p))
        (mask,) = re.fullmatch(r"and\.b32 \$0, \$1, (0x[0-9a-f]+);", asm).groups()
        mask = int(mask, 16)
        assert mask >> 16 == mask & 0xFFFF  # both halves alike
        low = mask & 0xFFFF
        pos = (low & -low).bit_length() - 1
        assert low == (2**bits - 1) << pos and pos + bits <= 10  # mantissa bits only: subnormal
        assert pos + (8 if high else 0) == p * bits  # the mask sits on field p
        for code in range(2**bits):
            word = code << (p * bits) | (0xFFFF ^ ((2**bits - 1) << (p * bits)))  # other bits set
            src = _high_bytes(word | word << 16) & 0xFFFF if high else word
            value = float(np.array([src & low], np.uint16).view(np.float16)[0])
            assert value * SUBNORMAL_UNIT * field_scale(bits, p) == code, (bits, p, code)


def test_a_field_outside_the_mantissa_is_refused():
    with pytest.raises(ValueError, match="mantissa"):
        _field_asm(4, 8)


def test_launch_defaults_give_every_setting_for_every_width_and_regime():
    keys = {"block_n", "num_warps", "res_stages", "maxnreg", "residual_split", "waves"}
    keys |= {"overlap", "fold_per_group"}
    for bits in (2, 4, 8):
        for rows in (1, 8, 32, 64, 128, 512):
            for tokens in (256, 8192, 131072):
                settings = launch_defaults(bits, rows, tokens)
                assert set(settings) == keys
                assert settings["block_n"] in (32, 64) and settings["num_warps"] in (1, 2)
                assert 1 <= settings["waves"] <= 24
    # many 2-bit rows: waves grow with the rows (about 33 splits a row on an H100), and short
    # caches over many rows keep to one resident round (more programs per SM)
    assert launch_defaults(2, 64, 131072)["waves"] > launch_defaults(2, 32, 131072)["waves"]
    assert launch_defaults(2, 64, 8192)["maxnreg"] < launch_defaults(2, 64, 131072)["maxnreg"]
