"""Packing round-trips; dequantised values lie within half a step of the input."""

from __future__ import annotations

import pytest
import torch

from methods.quant import dequantize, pack, quantize, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trips(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 37), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == -(-37 * bits // 8)
    assert torch.equal(unpack(packed, bits, 37), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [-1, -2])
def test_dequantised_within_half_a_step(bits, dim):
    torch.manual_seed(bits)
    x = torch.randn(4, 32, 64) * 3
    q = quantize(x, bits, dim)
    err = (dequantize(q) - x).abs()
    # half a step, plus float16 rounding of the stored minimum and step (times the largest code)
    bound = (
        q.scale.float() / 2 + (2**bits) * q.scale.float() * 2**-11 + q.zero.float().abs() * 2**-11
    )
    assert (err <= bound + 1e-6).all()
    assert q.nbytes() < x.numel() * 2  # smaller than float16
