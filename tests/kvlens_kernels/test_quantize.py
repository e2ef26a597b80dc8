"""Quantise-and-pack: the reference is methods.quant's arithmetic in the decode layout, codes
dequantise within half a step, and the Triton kernel in the interpreter gives the same bytes."""

from __future__ import annotations

import pytest
import torch

from kvlens_kernels.quantize import pack_words, quantize_groups, unpack_words
from tests.kvlens_kernels.interpreter import needs_triton, run_check


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_codes_dequantise_within_half_a_step(bits, per_channel):
    torch.manual_seed(bits)
    keys, values = torch.randn(3, 64, 32) * 4, torch.randn(3, 64, 32)
    out = quantize_groups(
        keys, values, key_bits=bits, value_bits=bits, group=16, key_per_channel=per_channel
    )
    assert out.key_codes.shape == (3, 64, 32 * bits // 8)
    kc = unpack_words(out.key_codes, bits).float()
    if per_channel:
        assert out.key_scale.shape == (3, 4, 32)
        ks = out.key_scale.float().repeat_interleave(16, 1)
        kz = out.key_zero.float().repeat_interleave(16, 1)
    else:
        ks, kz = out.key_scale.float()[..., None], out.key_zero.float()[..., None]
    k = kc * ks + kz
    step = ks.expand_as(k)
    assert ((k - keys).abs() <= step / 2 + 1e-3 * step + 2e-3).all()
    v = unpack_words(out.value_codes, bits).float() * out.value_scale.float()[..., None]
    v = v + out.value_zero.float()[..., None]
    assert ((v - values).abs() <= out.value_scale.float()[..., None] / 2 + 2e-3).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_word_layout_puts_each_field_on_a_contiguous_channel_block(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 64), dtype=torch.uint8)
    packed = pack_words(codes, bits)
    assert packed.shape == (2, 3, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_words(packed, bits), codes)
    assert torch.equal(unpack_words(packed, bits, torch.float32), codes.float())
    words = packed[..., 0::2].int() | (packed[..., 1::2].int() << 8)  # little-endian
    w = 64 * bits // 16
    for p in range(16 // bits):  # field p of word e is channel e + p * w
        field = (words >> (p * bits)) & (2**bits - 1)
        assert torch.equal(field.to(torch.uint8), codes[..., p * w : (p + 1) * w])
    with pytest.raises(ValueError, match="do not fill"):
        pack_words(codes[..., :63], bits)


def test_tokens_that_are_not_whole_groups_are_refused():
    x = torch.randn(1, 20, 16)
    with pytest.raises(ValueError, match="whole groups"):
        quantize_groups(x, x, key_bits=2, value_bits=2, group=16, key_per_channel=True)


@needs_triton
@pytest.mark.parametrize("script,cases", [("quantize_check.py", 4), ("quant_decode_check.py", 8)])
def test_kernels_match_references_in_the_interpreter(script, cases):
    assert f"ok: {cases} cases" in run_check(script)
