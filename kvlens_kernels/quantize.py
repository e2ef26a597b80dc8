"""Quantise-and-pack of whole groups of new tokens, as a quantised cache appends them.

Input: keys and values [H, N, D] (N a multiple of ``group``, any float dtype). Output, per KV
head, in the layout ``kvlens_kernels.quant_decode`` reads:
  key codes [H, N, D*kb/8] uint8 in the word layout (``pack_words``); key scale and zero
  [H, N/group, D] float16 when keys are quantised per channel over each group of tokens
  (KIVI), or [H, N] when per token; value codes [H, N, D*vb/8] in the word layout; value
  scale and zero [H, N] float16 (per token).
Word layout: a token's codes are W = D*b/16 little-endian 16-bit words; field p of word e
(bits p*b .. p*b+b-1) holds the code of channel e + p*W. So each field of the words is a
contiguous block of W channels, which the decode kernel multiplies as one operand after
masking it out of the 16-bit words (``kvlens_kernels.quant_decode``).
The arithmetic is ``methods.quant.quantize`` (asymmetric round-to-nearest-even, fp16 scale
and minimum), so the kernel and the reference produce the same codes.

File order: word layout -> kernel -> launcher -> reference -> dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.quant import quantize, unpack

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


@dataclass
class QuantBlocks:
    """Packed codes, scales and zero points of some groups of tokens (layout above)."""

    key_codes: torch.Tensor
    key_scale: torch.Tensor
    key_zero: torch.Tensor
    value_codes: torch.Tensor
    value_scale: torch.Tensor
    value_zero: torch.Tensor


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [..., D] (values < 2^bits, D a multiple of 16/bits) -> uint8
    [..., D*bits/8] in the word layout."""
    d = codes.shape[-1]
    fields = 16 // bits
    if d % fields:
        raise ValueError(f"{d} channels do not fill {bits}-bit words ({fields} fields each)")
    parts = codes.to(torch.int32).reshape(*codes.shape[:-1], fields, d // fields)
    words = torch.zeros_like(parts[..., 0, :])
    for p in range(fields):
        words |= parts[..., p, :] << (p * bits)
    little_endian = torch.stack([words & 0xFF, words >> 8], -1)
    return little_endian.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack_words(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """uint8 [..., D*bits/8] in the word layout -> codes [..., D] (uint8, or ``dtype``: the
    same integers, e.g. float32 for a dequantisation, without a uint8 copy between)."""
    b = packed.to(torch.int32)
    words = b[..., 0::2] | (b[..., 1::2] << 8)
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 16, bits, dtype=torch.int32, device=packed.device)
    fields = (words[..., None, :] >> shifts[:, None]) & mask  # [..., 16/bits fields, W]
    return fields.flatten(-2).to(dtype)  # field p holds channels p*W .. p*W + W-1


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        r = tl.floor(x + 0.5)
        tie = (r - x) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _codes(x, lo, hi, BITS: tl.constexpr):
        """Codes of x given broadcastable group minimum/maximum; also fp16 step and minimum."""
        levels: tl.constexpr = (1 << BITS) - 1
        lo16 = lo.to(tl.float16).to(tl.float32)
        hi16 = hi.to(tl.float16).to(tl.float32)
        step = (
            tl.maximum(tl.div_rn(hi16 - lo16, tl.full(hi16.shape, levels, tl.float32)), 1e-8)
            .to(tl.float16)
            .to(tl.float32)
        )
        ok = step > 0
        q = _round_half_even(tl.div_rn(x - lo16, tl.where(ok, step, 1.0)))  # IEEE, as torch
        q = tl.where(ok, tl.minimum(tl.maximum(q, 0.0), levels), 0.0)
        return q.to(tl.int32), step, lo16

    @triton.jit
    def _pack(codes, ROWS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
        """int32 codes [ROWS, D] -> int16 words [ROWS, D * BITS / 16] (the word layout)."""
        FIELDS: tl.constexpr = 16 // BITS
        parts = tl.reshape(codes, [ROWS, FIELDS, D // FIELDS])  # field p: channels p*W + e
        shifts = tl.arange(0, FIELDS) * BITS
        return tl.sum(parts << shifts[None, :, None], 1).to(tl.int16)

    @triton.jit
    def _quantize_groups(
        K, V, KC, KS, KZ, VC, VS, VZ, N,
        GROUP: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
        KEY_PER_CHANNEL: tl.constexpr,
    ):  # fmt: skip
        h = tl.program_id(0)
        blk = tl.program_id(1)
        rows = blk * GROUP + tl.arange(0, GROUP)
        offs_d = tl.arange(0, D)
        tile = h * N * D + rows[:, None] * D + offs_d[None, :]
        x = tl.load(K + tile).to(tl.float32)
        if KEY_PER_CHANNEL:
            codes, step, lo = _codes(x, tl.min(x, 0)[None, :], tl.max(x, 0)[None, :], KBITS)
            n_groups = N // GROUP
            srow = (h * n_groups + blk) * D + offs_d
            tl.store(KS + srow, tl.reshape(step, [D]).to(tl.float16))
            tl.store(KZ + srow, tl.reshape(lo, [D]).to(tl.float16))
        else:
            codes, step, lo = _codes(x, tl.min(x, 1)[:, None], tl.max(x, 1)[:, None], KBITS)
            tl.store(KS + h * N + rows, tl.reshape(step, [GROUP]).to(tl.float16))
            tl.store(KZ + h * N + rows, tl.reshape(lo, [GROUP]).to(tl.float16))
        wk: tl.constexpr = D * KBITS // 16  # words per token
        out = h * N * wk + rows[:, None] * wk + tl.arange(0, wk)[None, :]
        tl.store(KC + out, _pack(codes, GROUP, D, KBITS))

        y = tl.load(V + tile).to(tl.float32)
        vcodes, vstep, vlo = _codes(y, tl.min(y, 1)[:, None], tl.max(y, 1)[:, None], VBITS)
        tl.store(VS + h * N + rows, tl.reshape(vstep, [GROUP]).to(tl.float16))
        tl.store(VZ + h * N + rows, tl.reshape(vlo, [GROUP]).to(tl.float16))
        wv: tl.constexpr = D * VBITS // 16
        vout = h * N * wv + rows[:, None] * wv + tl.arange(0, wv)[None, :]
        tl.store(VC + vout, _pack(vcodes, GROUP, D, VBITS))


def empty_blocks(
    h: int, n: int, d: int, kb: int, vb: int, group: int, per_channel: bool, dev
) -> QuantBlocks:
    """Uninitialised output buffers for ``n`` tokens of ``h`` heads (n a multiple of group)."""
    u8, f16 = {"dtype": torch.uint8, "device": dev}, {"dtype": torch.float16, "device": dev}
    key_scale_shape = (h, n // group, d) if per_channel else (h, n)
    return QuantBlocks(
        torch.empty(h, n, d * kb // 8, **u8),
        torch.empty(key_scale_shape, **f16),
        torch.empty(key_scale_shape, **f16),
        torch.empty(h, n, d * vb // 8, **u8),
        torch.empty(h, n, **f16),
        torch.empty(h, n, **f16),
    )


def quantize_groups_triton(
    keys: torch.Tensor, values: torch.Tensor, *, key_bits: int, value_bits: int, group: int,
    key_per_channel: bool,
) -> QuantBlocks:  # fmt: skip
    """One program per (head, group of tokens)."""
    h, n, d = keys.shape
    keys, values = keys.contiguous(), values.contiguous()
    out = empty_blocks(h, n, d, key_bits, value_bits, group, key_per_channel, keys.device)
    _quantize_groups[(h, n // group)](
        keys, values, out.key_codes.view(torch.int16), out.key_scale, out.key_zero,
        out.value_codes.view(torch.int16), out.value_scale, out.value_zero, n,
        GROUP=group, D=d, KBITS=key_bits, VBITS=value_bits, KEY_PER_CHANNEL=key_per_channel,
    )  # fmt: skip
    return out


def quantize_groups_reference(
    keys: torch.Tensor, values: torch.Tensor, *, key_bits: int, value_bits: int, group: int,
    key_per_channel: bool,
) -> QuantBlocks:  # fmt: skip
    """The same codes by ``methods.quant.quantize`` (any device), laid out in words."""
    h, n, d = keys.shape
    if key_per_channel:
        qk = quantize(keys.reshape(h, n // group, group, d), key_bits, dim=2)
        key_codes = qk.packed.reshape(h, n, -1)
        key_scale, key_zero = qk.scale.reshape(h, n // group, d), qk.zero.reshape(h, n // group, d)
    else:
        qk = quantize(keys, key_bits, dim=-1)
        key_codes, key_scale, key_zero = qk.packed, qk.scale[..., 0], qk.zero[..., 0]
    qv = quantize(values, value_bits, dim=-1)
    return QuantBlocks(
        pack_words(unpack(key_codes, key_bits, d), key_bits),
        key_scale,
        key_zero,
        pack_words(unpack(qv.packed, value_bits, d), value_bits),
        qv.scale[..., 0],
        qv.zero[..., 0],
    )


def kernel_applies(x: torch.Tensor, group: int, key_bits: int, value_bits: int) -> bool:
    """The Triton path: CUDA, power-of-two group (>= 1) and head dimension (>= 16)."""
    d = x.shape[-1]
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
    return (
        x.is_cuda
        and triton is not None
        and pow2(group)
        and pow2(d)
        and d >= 16
        and key_bits in (2, 4, 8)
        and value_bits in (2, 4, 8)
    )


def quantize_groups(
    keys: torch.Tensor, values: torch.Tensor, *, key_bits: int, value_bits: int, group: int,
    key_per_channel: bool,
) -> QuantBlocks:  # fmt: skip
    """Dispatch: the Triton kernel on CUDA where it applies, the reference elsewhere."""
    if keys.shape[1] % group:
        raise ValueError(f"{keys.shape[1]} tokens are not whole groups of {group}")
    args = dict(
        key_bits=key_bits, value_bits=value_bits, group=group, key_per_channel=key_per_channel
    )
    if kernel_applies(keys, group, key_bits, value_bits):
        with torch.cuda.device(keys.device):
            return quantize_groups_triton(keys, values, **args)
    return quantize_groups_reference(keys, values, **args)
