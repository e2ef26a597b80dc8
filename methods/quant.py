"""Uniform quantisation with packed storage: the shared arithmetic of the quantisation family.

Asymmetric round-to-nearest: for a group with minimum ``lo`` and maximum ``hi`` along ``dim``,
step = (hi - lo) / (2^bits - 1), codes = round((x - lo) / step) in [0, 2^bits - 1], and the
dequantised value lo + code * step lies within step / 2 of x. Scales and zero points are
kept in float16, as KIVI stores them, and codes are packed 8 / bits to a byte along the last
dimension. Everything kept is counted in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.memory import held_bytes


@dataclass
class Quantized:
    """Packed codes of a tensor [..., n] quantised with per-group scale and zero point."""

    packed: torch.Tensor  # uint8 [..., ceil(n * bits / 8)]
    scale: torch.Tensor  # float16, broadcastable to the input
    zero: torch.Tensor  # float16 (the group minimum)
    bits: int
    n: int  # length of the last dimension before packing

    def nbytes(self) -> int:
        return held_bytes(self.packed, self.scale, self.zero)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] with values < 2^bits -> [..., ceil(n * bits / 8)] bytes."""
    per_byte = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], -1)
    codes = codes.view(*codes.shape[:-1], -1, per_byte).to(torch.uint8)
    out = torch.zeros(codes.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per_byte):
        out |= codes[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per_byte)]
    return torch.stack(parts, -1).flatten(-2)[..., :n]


def quantize(x: torch.Tensor, bits: int, dim: int) -> Quantized:
    """Quantise ``x`` with one (scale, zero) per slice along ``dim``; codes packed on the
    last dimension."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    xf = x.float()
    lo = xf.amin(dim, keepdim=True).half()
    hi = xf.amax(dim, keepdim=True).half()
    step = ((hi.float() - lo.float()) / (2**bits - 1)).clamp_min(1e-8).half()
    # a constant group whose fp16 step underflows to 0 gets code 0 (dequantises to lo exactly)
    ok = step.float() > 0
    codes = torch.round((xf - lo.float()) / torch.where(ok, step.float(), 1.0))
    codes = torch.where(ok, codes.clamp(0, 2**bits - 1), 0).to(torch.uint8)
    return Quantized(pack(codes, bits), step, lo, bits, x.shape[-1])


def dequantize(q: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack(q.packed, q.bits, q.n).float()
    return (codes * q.scale.float() + q.zero.float()).to(dtype)
