"""Single-token decode attention over a KIVI-layout quantised cache, read in its packed form.

Layout (``QuantKV``, batch-first, per KV head): the oldest ``n_quant`` tokens as packed codes
in the word layout of ``kvlens_kernels.quantize`` (keys per channel over groups of ``group`` tokens,
or per token; values per token; 2, 4 or 8 bits, fp16 scales and zero points), then
``n_residual`` newest tokens in full precision. One program per (batch, KV head, split)
holds all query heads of the group.

How the packed codes are read: each field of the 16-bit words is a contiguous block of
W = D*b/16 channels, so the kernel loads codes as 16-bit words (the shared-memory-to-register
path of 16-bit operands), and per field p turns them into float16 values with one ``and``:
the field masked in place, exponent bits zero, is a float16 subnormal worth code * 2^(pos - 24),
exactly, and the tensor cores multiply subnormals exactly (checked on the H100: the same
outputs as an exact unpacking to integer codes, tests/gpu); the 2^-pos folds into the query
block (keys) or the block's output (values), the 2^24 into one multiply of each product.
(The query block q * key scale * 2^-pos is rounded to float16 with pos <= 8: entries below
2^-6 become subnormal, an absolute error of at most 2^(pos - 25) each; measured no larger
than the exact unpacking's error with keys scaled down to 0.01, benchmarks/RESULTS.md.)
Fields past the mantissa's 10 bits are read from the words' high bytes, which one byte
permute per two words provides. The products are
transposed, tokens as rows: scores S^T [BLOCK_N, GP] = codes_p @ (q_p)^T and the output
O^T [D, GP] per channel block = codes_p^T @ P^T, so the 4-head query group pads the tensor-core
tile's 8-wide N side rather than its 16-row M side (half the padded products, half the
softmax work: 1.2x faster for 2-bit codes than query rows as M, benchmarks/RESULTS.md).
For per-channel keys the group's scale and zero fold into the query (once per key group, held
across its tiles, where registers allow); the zero point adds sum(q * zero) to every score. Values fold their per-token scale into the probabilities:
out_p += codes_p^T @ (p * value_scale), and sum(p * value_zero) is added to every channel. The
blocks join into channel order once per program. The residual is the last segment of the same
online softmax, read by the last split: by default a split of its own past the codes, so it
runs beside them. Splits are combined by ``kvlens_kernels.split_decode``. Where registers allow (2-bit
codes over a few rows), the loop is skewed by one tile: the next tile's scores are computed before
this tile's softmax and value products, so the scheduler has two independent chains to interleave.

File order: kernel -> launcher -> reference -> dispatcher.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from kvlens_kernels.quantize import QuantBlocks, unpack_words
from kvlens_kernels.split_decode import (
    LOG2E,
    attend_heads,
    combine_splits,
    group_pad,
    partial_buffers,
    plan_splits,
)

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    from kvlens_kernels.split_decode import softmax_block, store_partial
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


@dataclass
class QuantKV:
    """A quantised KV cache in the decode kernel's layout ([B, H, ...] tensors)."""

    key_codes: torch.Tensor  # uint8 [B, H, C, D*kb/8], word layout (kvlens_kernels.quantize)
    key_scale: torch.Tensor  # fp16 [B, H, C/group, D] per channel, or [B, H, C] per token
    key_zero: torch.Tensor
    value_codes: torch.Tensor  # uint8 [B, H, C, D*vb/8], word layout
    value_scale: torch.Tensor  # fp16 [B, H, C]
    value_zero: torch.Tensor
    residual_keys: torch.Tensor  # [B, H, R, D], the model's dtype
    residual_values: torch.Tensor
    n_quant: int  # code rows in use: a multiple of ``group``
    n_residual: int
    key_bits: int
    value_bits: int
    group: int
    key_per_channel: bool

    @property
    def head_dim(self) -> int:
        return self.residual_keys.shape[-1]

    @classmethod
    def from_blocks(
        cls, blocks: QuantBlocks, residual_keys: torch.Tensor, residual_values: torch.Tensor,
        *, key_bits: int, value_bits: int, group: int, key_per_channel: bool,
        n_residual: int | None = None,
    ) -> QuantKV:  # fmt: skip
        """A cache from ``kvlens_kernels.quantize`` output for B x H rows ([B*H, n, ...], all in use)
        and a residual [B, H, R, D] (its first ``n_residual`` rows in use, default all)."""
        bsz, hkv = residual_keys.shape[:2]
        parts = [getattr(blocks, f.name) for f in dataclasses.fields(blocks)]
        parts = [p.reshape(bsz, hkv, *p.shape[1:]) for p in parts]
        return cls(
            *parts, residual_keys, residual_values,
            n_quant=blocks.key_codes.shape[1],
            n_residual=residual_keys.shape[2] if n_residual is None else n_residual,
            key_bits=key_bits, value_bits=value_bits, group=group,
            key_per_channel=key_per_channel,
        )  # fmt: skip


def _field_asm(bits: int, pos: int) -> str:
    """PTX: two 16-bit words -> two float16 values code * 2^(pos - 24) of the ``bits``-wide
    field at bit ``pos`` (which must lie in the float16 mantissa: pos + bits <= 10).

    One ``and`` per two words: the field masked in place, with the exponent bits zero, is a
    float16 subnormal whose value is its mantissa times 2^-24, exactly. The caller multiplies
    by ``field_scale`` (a power of two) to get codes."""
    if pos + bits > 10:
        raise ValueError(f"a {bits}-bit field at bit {pos} is not inside the float16 mantissa")
    mask = (((1 << bits) - 1) << pos) * 0x10001
    return f"and.b32 $0, $1, {mask:#010x};"


# PTX: two 16-bit words -> their high bytes (w >> 8) in one byte permute: output bytes 0 and 2
# are input bytes 1 and 3, bytes 1 and 3 come from the zero operand (selector 4)
HIGH_BYTES_ASM = "prmt.b32 $0, $1, 0, 0x4341;"


def field_position(bits: int, p: int) -> int:
    """Bit position of field p in what it is unpacked from: the word, or for a field reaching
    past the float16 mantissa (bit 10) the words' high bytes (one permute per two words serves
    all such fields)."""
    pos = p * bits
    return pos - 8 if pos + bits > 10 else pos


def field_from_high_bytes(bits: int, p: int) -> bool:
    """Whether field p is unpacked from the words' high bytes (``field_position``)."""
    return field_position(bits, p) != p * bits


def field_scale(bits: int, p: int) -> float:
    """What field p's unpacked values (code * 2^(position - 24)) are multiplied by to give the
    codes, split as 2^24 (``SUBNORMAL_UNIT``, applied once to a product) and 2^-position:
    2^-position, the part folded into the query block (keys) or applied to the block's output
    at the end (values)."""
    return 2.0 ** -field_position(bits, p)


SUBNORMAL_UNIT = 2.0**24  # 1 / the value of a float16 subnormal's lowest mantissa bit


if triton is not None:
    _field_asm_constexpr = triton.constexpr_function(_field_asm)
    _position_constexpr = triton.constexpr_function(field_position)
    _HIGH_BYTES = tl.constexpr(HIGH_BYTES_ASM)
    _UNIT = tl.constexpr(SUBNORMAL_UNIT)

    @triton.jit
    def _unpack_at(words, POS: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr):
        """The BITS-wide field at bit POS of int16 words as float16 code * 2^(POS - 24)."""
        if FAST:  # one instruction per two words, no integer-to-float conversions
            codes = tl.inline_asm_elementwise(
                _field_asm_constexpr(BITS, POS), "=r,r", [words], dtype=tl.float16,
                is_pure=True, pack=2,
            )  # fmt: skip
        else:  # the same values by arithmetic (Triton's interpreter runs no PTX)
            codes = (words.to(tl.int32) & (((1 << BITS) - 1) << POS)).to(tl.float32) / _UNIT
            codes = codes.to(tl.float16)
        return codes

    @triton.jit
    def _high_bytes(words, FAST: tl.constexpr):
        """int16 words -> their high bytes, as int16."""
        if FAST:
            high = tl.inline_asm_elementwise(
                _HIGH_BYTES, "=r,r", [words], dtype=tl.int16, is_pure=True, pack=2
            )
        else:
            high = ((words.to(tl.int32) >> 8) & 0xFF).to(tl.int16)
        return high

    @triton.jit
    def _field(words, high, P: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr):
        """Field P of int16 words (``high``: their high bytes) as float16 code * 2^(pos - 24)."""
        POS: tl.constexpr = _position_constexpr(BITS, P)
        if POS != P * BITS:  # field_from_high_bytes
            codes = _unpack_at(high, POS, BITS, FAST)
        else:
            codes = _unpack_at(words, POS, BITS, FAST)
        return codes

    @triton.jit
    def _field_scale(BITS: tl.constexpr, P: tl.constexpr):
        """``field_scale`` as a compile-time constant."""
        return 2.0 ** -_position_constexpr(BITS, P)

    @triton.jit
    def _query_part(
        q_ptr, offs_g, row_ok, srow, zrow, offs_w, P: tl.constexpr, W: tl.constexpr,
        D: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    ):  # fmt: skip
        """Channel block P of the query folded for the key codes, float16 [W, GP]: q * 2^-pos,
        times the group's channel scales for per-channel keys; and its zero-point term [W, GP]:
        q * zero per channel, or q itself per token (the caller multiplies by each token's zero)."""
        ch = P * W + offs_w
        q_t = tl.load(q_ptr + offs_g[None, :] * D + ch[:, None], mask=row_ok[None, :], other=0.0)
        q_t = q_t.to(tl.float32)
        if PER_CHANNEL:
            sc = tl.load(srow + ch).to(tl.float32)
            zc = tl.load(zrow + ch).to(tl.float32)
            folded = q_t * (sc * _field_scale(BITS, P))[:, None]
            zterm = q_t * zc[:, None]
        else:
            folded = q_t * _field_scale(BITS, P)
            zterm = q_t
        return folded.to(tl.float16), zterm

    @triton.jit
    def _folded_query(
        q_ptr, offs_g, row_ok, KS, KZ, pid_bh, ks_bh, n0, offs_kw, KW: tl.constexpr,
        KP: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, QGROUP: tl.constexpr,
        PER_CHANNEL: tl.constexpr,
    ):  # fmt: skip
        """The query folded for the keys of the group holding token n0, per channel block
        (g0..g7; those past KP repeat g0, unused), and the zero-point term summed over channels
        [GP] (one reduction, not one per block)."""
        srow = KS + pid_bh * ks_bh + (n0 // QGROUP) * D
        zrow = KZ + pid_bh * ks_bh + (n0 // QGROUP) * D
        args = (q_ptr, offs_g, row_ok, srow, zrow, offs_kw)
        g0, z = _query_part(*args, 0, KW, D, KBITS, PER_CHANNEL)
        g1, z1 = _query_part(*args, 1, KW, D, KBITS, PER_CHANNEL)
        z += z1
        g2 = g0
        g3 = g0
        g4 = g0
        g5 = g0
        g6 = g0
        g7 = g0
        if KP >= 4:
            g2, z2 = _query_part(*args, 2, KW, D, KBITS, PER_CHANNEL)
            g3, z3 = _query_part(*args, 3, KW, D, KBITS, PER_CHANNEL)
            z += z2 + z3
        if KP >= 8:
            g4, z4 = _query_part(*args, 4, KW, D, KBITS, PER_CHANNEL)
            g5, z5 = _query_part(*args, 5, KW, D, KBITS, PER_CHANNEL)
            g6, z6 = _query_part(*args, 6, KW, D, KBITS, PER_CHANNEL)
            g7, z7 = _query_part(*args, 7, KW, D, KBITS, PER_CHANNEL)
            z += z4 + z5 + z6 + z7
        return g0, g1, g2, g3, g4, g5, g6, g7, tl.sum(z, 0)

    @triton.jit
    def _value_part(
        acc, alpha, pv, vw, vw_high, P: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr
    ):
        """acc [W, GP] (channel block P of the transposed output, in units of 2^-24 times field
        P's position scale) * alpha + codes_P^T @ pv."""
        return tl.dot(_field(vw, vw_high, P, BITS, FAST), pv, acc * alpha[None, :])

    @triton.jit
    def _tile_scores(
        kc_base, offs_kw, KS, KZ, pid_bh, ks_bh, n0, end, scale_log2,
        g0, g1, g2, g3, g4, g5, g6, g7, zq, GP: tl.constexpr, KW: tl.constexpr,
        KP: tl.constexpr, BLOCK_N: tl.constexpr, KBITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
        FAST: tl.constexpr,
    ):  # fmt: skip
        """Scores [BLOCK_N, GP] of the tile at token n0 in base-2 logit units, -inf past ``end``,
        given the folded query of its key group (``_folded_query``)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = offs_n < end
        # key words [BLOCK_N, KW] as stored: tokens are the products' rows (operand A)
        kw = tl.load(kc_base + offs_n[:, None] * KW + offs_kw[None, :], mask=ok[:, None], other=0)
        kw_high = _high_bytes(kw, FAST)
        s = tl.zeros([BLOCK_N, GP], tl.float32)  # in units of 2^-24
        s = tl.dot(_field(kw, kw_high, 0, KBITS, FAST), g0, s)
        s = tl.dot(_field(kw, kw_high, 1, KBITS, FAST), g1, s)
        if KP >= 4:
            s = tl.dot(_field(kw, kw_high, 2, KBITS, FAST), g2, s)
            s = tl.dot(_field(kw, kw_high, 3, KBITS, FAST), g3, s)
        if KP >= 8:
            s = tl.dot(_field(kw, kw_high, 4, KBITS, FAST), g4, s)
            s = tl.dot(_field(kw, kw_high, 5, KBITS, FAST), g5, s)
            s = tl.dot(_field(kw, kw_high, 6, KBITS, FAST), g6, s)
            s = tl.dot(_field(kw, kw_high, 7, KBITS, FAST), g7, s)
        if PER_CHANNEL:
            s = s * _UNIT + zq[None, :]
        else:
            ks = tl.load(KS + pid_bh * ks_bh + offs_n, mask=ok, other=0.0).to(tl.float32)
            kz = tl.load(KZ + pid_bh * ks_bh + offs_n, mask=ok, other=0.0).to(tl.float32)
            s = s * (ks * _UNIT)[:, None] + kz[:, None] * zq[None, :]
        return tl.where(ok[:, None], s * scale_log2, float("-inf"))

    @triton.jit
    def _tile_values(
        s, n0, end, m_i, l_i, az, a0, a1, a2, a3, a4, a5, a6, a7,
        VS, VZ, vc_base, pid_bh, vs_bh, offs_vw, VW: tl.constexpr, VP: tl.constexpr,
        BLOCK_N: tl.constexpr, VBITS: tl.constexpr, FAST: tl.constexpr,
    ):  # fmt: skip
        """One online-softmax step over the tile at token n0 given its scores ``s``: the running
        max, sum, value zero-point term and the eight (or fewer) block accumulators."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = offs_n < end
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        vs = tl.load(VS + pid_bh * vs_bh + offs_n, mask=ok, other=0.0).to(tl.float32)
        vz = tl.load(VZ + pid_bh * vs_bh + offs_n, mask=ok, other=0.0).to(tl.float32)
        # value words loaded transposed [VW, BLOCK_N]: channels are the products' rows
        vw = tl.load(vc_base + offs_n[None, :] * VW + offs_vw[:, None], mask=ok[None, :], other=0)
        vw_high = _high_bytes(vw, FAST)
        pv = (p * vs[:, None]).to(tl.float16)
        az = az * alpha + tl.sum(p * vz[:, None], 0)
        a0 = _value_part(a0, alpha, pv, vw, vw_high, 0, VBITS, FAST)
        a1 = _value_part(a1, alpha, pv, vw, vw_high, 1, VBITS, FAST)
        if VP >= 4:
            a2 = _value_part(a2, alpha, pv, vw, vw_high, 2, VBITS, FAST)
            a3 = _value_part(a3, alpha, pv, vw, vw_high, 3, VBITS, FAST)
        if VP >= 8:
            a4 = _value_part(a4, alpha, pv, vw, vw_high, 4, VBITS, FAST)
            a5 = _value_part(a5, alpha, pv, vw, vw_high, 5, VBITS, FAST)
            a6 = _value_part(a6, alpha, pv, vw, vw_high, 6, VBITS, FAST)
            a7 = _value_part(a7, alpha, pv, vw, vw_high, 7, VBITS, FAST)
        return m_new, l_i, az, a0, a1, a2, a3, a4, a5, a6, a7

    @triton.jit
    def _quant_decode_split(
        Q, KC, KS, KZ, VC, VS, VZ, RK, RV, O_PART, L_PART,
        stride_qb, stride_qh, kc_bh, ks_bh, vc_bh, vs_bh, rk_bh, rv_bh,
        H_KV, N_SPLITS, SPLIT_LEN, N_QUANT, N_RES, scale_log2, NLEN,
        GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        KBITS: tl.constexpr, VBITS: tl.constexpr, QGROUP: tl.constexpr,
        PER_CHANNEL: tl.constexpr, FAST: tl.constexpr, RES_STAGES: tl.constexpr,
        OVERLAP: tl.constexpr, FOLD_PER_GROUP: tl.constexpr, DEVICE_LEN: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        if DEVICE_LEN:  # lengths held on the device (a captured step): [n_quant, n_residual]
            N_QUANT = tl.load(NLEN)
            N_RES = tl.load(NLEN + 1)
        b = pid_bh // H_KV
        h = pid_bh % H_KV
        KP: tl.constexpr = 16 // KBITS  # fields per word: channel blocks
        VP: tl.constexpr = 16 // VBITS
        KW: tl.constexpr = D // KP  # words per token: channels per block
        VW: tl.constexpr = D // VP
        offs_g = tl.arange(0, GP)
        row_ok = offs_g < GROUP
        offs_kw = tl.arange(0, KW)
        offs_vw = tl.arange(0, VW)
        offs_d = tl.arange(0, D)
        q_ptr = Q + b * stride_qb + h * GROUP * stride_qh  # stride_qh == D (made contiguous)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        # the output transposed, per channel block: a_p [VW, GP] holds channels p*VW + e
        a0 = tl.zeros([VW, GP], tl.float32)
        a1 = tl.zeros([VW, GP], tl.float32)
        a2 = tl.zeros([VW, GP], tl.float32)
        a3 = tl.zeros([VW, GP], tl.float32)
        a4 = tl.zeros([VW, GP], tl.float32)
        a5 = tl.zeros([VW, GP], tl.float32)
        a6 = tl.zeros([VW, GP], tl.float32)
        a7 = tl.zeros([VW, GP], tl.float32)
        az = tl.zeros([GP], tl.float32)  # sum of p * value zero point, added to every channel
        start = split * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, N_QUANT)
        kc_base = KC + pid_bh * kc_bh
        vc_base = VC + pid_bh * vc_bh
        # the query folded for the split's first key group (a split past the codes has none:
        # its scale rows do not exist): g0..g7 and the zero-point term, as one tuple
        g0 = tl.zeros([KW, GP], tl.float16)
        folded = (g0, g0, g0, g0, g0, g0, g0, g0, tl.zeros([GP], tl.float32))
        qargs = (q_ptr, offs_g, row_ok, KS, KZ, pid_bh, ks_bh)
        if start < end:
            folded = _folded_query(*qargs, start, offs_kw, KW, KP, D, KBITS, QGROUP, PER_CHANNEL)
        sargs = (kc_base, offs_kw, KS, KZ, pid_bh, ks_bh)
        vargs = (VS, VZ, vc_base, pid_bh, vs_bh, offs_vw)  # (constexprs do not pass in tuples)
        state = (m_i, l_i, az, a0, a1, a2, a3, a4, a5, a6, a7)  # the online softmax's
        if OVERLAP:
            # skewed by one tile: the next tile's scores are computed before this tile's values,
            # two independent chains of products and loads the scheduler interleaves (one-warp
            # 2-bit programs are latency-bound, benchmarks/RESULTS.md); the query is refolded
            # every tile, as holding it costs registers this schedule lacks
            s_cur = tl.full([BLOCK_N, GP], float("-inf"), tl.float32)
            if start < end:
                s_cur = _tile_scores(
                    *sargs, start, end, scale_log2, *folded, GP, KW, KP, BLOCK_N, KBITS,
                    PER_CHANNEL, FAST,
                )  # fmt: skip
            for n0 in tl.range(start, end - BLOCK_N, BLOCK_N):
                n1 = n0 + BLOCK_N
                f = _folded_query(*qargs, n1, offs_kw, KW, KP, D, KBITS, QGROUP, PER_CHANNEL)
                s_next = _tile_scores(
                    *sargs, n1, end, scale_log2, *f, GP, KW, KP, BLOCK_N, KBITS, PER_CHANNEL, FAST
                )
                state = _tile_values(s_cur, n0, end, *state, *vargs, VW, VP, BLOCK_N, VBITS, FAST)
                s_cur = s_next
            if start < end:
                last = start + ((end - start - 1) // BLOCK_N) * BLOCK_N
                state = _tile_values(s_cur, last, end, *state, *vargs, VW, VP, BLOCK_N, VBITS, FAST)
        else:
            for n0 in tl.range(start, end, BLOCK_N):
                if PER_CHANNEL:  # (per-token keys: the folded query holds for every tile)
                    # FOLD_PER_GROUP: refolded at each new key group and held across its tiles,
                    # fewer instructions, more live registers (int4: 3-5% faster, RESULTS.md);
                    # else refolded every tile
                    if ((n0 % QGROUP == 0) & (n0 != start)) | (not FOLD_PER_GROUP):
                        folded = _folded_query(
                            *qargs, n0, offs_kw, KW, KP, D, KBITS, QGROUP, PER_CHANNEL
                        )
                s = _tile_scores(
                    *sargs, n0, end, scale_log2, *folded, GP, KW, KP, BLOCK_N, KBITS,
                    PER_CHANNEL, FAST,
                )  # fmt: skip
                state = _tile_values(s, n0, end, *state, *vargs, VW, VP, BLOCK_N, VBITS, FAST)
        m_i, l_i, az, a0, a1, a2, a3, a4, a5, a6, a7 = state
        # blocks to output units (exact powers of two), then [VW, GP] back into [GP, D] in
        # channel order:
        a0 *= _UNIT * _field_scale(VBITS, 0)
        a1 *= _UNIT * _field_scale(VBITS, 1)
        if VP >= 4:
            a2 *= _UNIT * _field_scale(VBITS, 2)
            a3 *= _UNIT * _field_scale(VBITS, 3)
        if VP >= 8:
            a4 *= _UNIT * _field_scale(VBITS, 4)
            a5 *= _UNIT * _field_scale(VBITS, 5)
            a6 *= _UNIT * _field_scale(VBITS, 6)
            a7 *= _UNIT * _field_scale(VBITS, 7)
        # tl.join stacks on a new last axis, so after the joins axis 2 is bit 0 of the block
        # index p, axis 3 bit 1 ...
        if VP == 2:
            acc = tl.reshape(tl.permute(tl.join(a0, a1), (1, 2, 0)), [GP, D])
        elif VP == 4:
            acc = tl.join(tl.join(a0, a1), tl.join(a2, a3))
            acc = tl.reshape(tl.permute(acc, (1, 3, 2, 0)), [GP, D])
        else:
            acc = tl.join(
                tl.join(tl.join(a0, a1), tl.join(a2, a3)), tl.join(tl.join(a4, a5), tl.join(a6, a7))
            )
            acc = tl.reshape(tl.permute(acc, (1, 4, 3, 2, 0)), [GP, D])
        acc += az[:, None]
        # the full-precision residual: the last segment, read by the last split (whose loop over
        # codes is empty when the residual has a split of its own)
        res_end = tl.where(split == N_SPLITS - 1, N_RES, 0)
        q = tl.load(
            q_ptr + offs_g[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        # RES_STAGES 1 (2-bit): not pipelined, the staged fp16 tiles would take most of the
        # program's shared memory and fewer programs would fit on an SM for the loop above
        for n0 in tl.range(0, res_end, BLOCK_N, num_stages=RES_STAGES):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ok = offs_n < res_end
            tile = offs_n[:, None] * D + offs_d[None, :]
            k = tl.load(RK + pid_bh * rk_bh + tile, mask=ok[:, None], other=0.0)
            v = tl.load(RV + pid_bh * rv_bh + tile, mask=ok[:, None], other=0.0)
            m_i, l_i, acc = softmax_block(q.to(k.dtype), k, v, ok, m_i, l_i, acc, scale_log2)
        store_partial(O_PART, L_PART, (pid_bh * N_SPLITS + split) * GP, m_i, l_i, acc, GP, D)


def _per_bh(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A [B, H, ...] tensor with dense rows per (b, h) and (b, h) = b * H + h addressing,
    and the stride between consecutive (b, h)."""
    dense = all(t.stride(i) == math.prod(t.shape[i + 1 :]) for i in range(2, t.dim()))
    if not dense or (t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1)):
        t = t.contiguous()
    return t, t.stride(1)


def launch_defaults(key_bits: int, rows: int, tokens: int) -> dict:
    """Tile and launch settings for ``rows`` (batch x KV head) rows of ``tokens`` quantised
    tokens, measured best on an H100 at 8k-128k tokens, batch 1 to 16
    (benchmarks/RESULTS.md). All: 3 pipeline stages, splits of at least 256 tokens (shorter
    ones cost more to combine than they gain), the full-precision residual read by a split of
    its own (in parallel with the codes, not after the last split's).
    2-bit codes: 64-token tiles, one warp, the residual loop unpipelined (its staged fp16 tiles
    would take shared memory, so fewer programs per SM). A few rows: 8 waves of splits, the next
    tile's scores overlapped with this tile's values (1.09x at 128k batch 1, 1.11x at batch 2;
    slower at batch 8, where the extra live registers cost more programs per SM). Many
    rows: registers held to 192 (10 programs per SM), rows / 4 waves (8 at 32 rows, 16 at 64,
    at most 24: 5-16% faster than 168 registers and 12 or 20 waves at batch 4, 8 and 16, 8k-128k);
    but 168 registers and 12 waves for 64 or more rows of at most 2^19 row-tokens, where ten
    programs per SM leave a second, short round (batch 8 at 8k: 27.6 against 31.4 us).
    Wider codes, a few rows: 64-token tiles, two warps, a pipelined residual, 6 waves; many
    rows: 32-token tiles, one warp held to 128 registers, 16 waves.
    Per-channel keys' folded query is held across a key group's tiles (``fold_per_group``;
    int4 3-5% faster) except for 2-bit codes: the skewed loop refolds per tile, and over many
    rows, at 168 registers, holding it spills (5% slower at batch 4)."""
    settings = dict(block_n=64, num_warps=1, res_stages=1, maxnreg=None, residual_split=True)
    settings |= dict(overlap=False, fold_per_group=True)
    few = rows < 32
    if key_bits == 2 and few:
        return settings | dict(waves=8, overlap=True)
    if key_bits == 2:
        if rows >= 64 and rows * tokens <= 1 << 19:  # short: 10 programs per SM leave a tail
            return settings | dict(waves=12, maxnreg=168, fold_per_group=False)
        waves = min(24, max(8, rows // 4))  # about 33 splits per row up to 64 rows
        return settings | dict(waves=waves, maxnreg=192, fold_per_group=False)
    if few:
        return settings | dict(num_warps=2, res_stages=2, waves=6)
    return settings | dict(block_n=32, waves=16, maxnreg=128)


def quant_decode_triton(
    q: torch.Tensor, cache: QuantKV, *, scale: float, split_len: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    fast_unpack: bool | None = None, waves: int | None = None, res_stages: int | None = None,
    maxnreg: int | None = None, residual_split: bool | None = None, overlap: bool | None = None,
    fold_per_group: bool | None = None, lengths: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [B, Hq, D] -> [B, Hq, D]: the split kernel, then the LSE combine. Settings left out
    come from ``launch_defaults``; ``residual_split``: the full-precision residual is read by a
    split of its own rather than by the last split of codes; ``overlap``: each iteration computes
    the next tile's scores before this tile's values (same results, another schedule);
    ``fold_per_group``: without ``overlap``, per-channel keys' folded query (q times the group's
    scales) is computed once per key group rather than per tile; ``maxnreg`` 0: no register cap.
    ``lengths`` (int32 [2] on the device: quantised tokens, residual tokens): the kernel reads
    the lengths there, and ``cache.n_quant`` / ``cache.n_residual`` are capacities that fix the
    launch (for a step captured in a CUDA graph, ``methods.fast_decode``)."""
    bsz, hq, d = q.shape
    hkv = cache.key_codes.shape[1]
    if fast_unpack is None:  # PTX unpacking on the GPU; plain shifts in the interpreter
        fast_unpack = os.environ.get("TRITON_INTERPRET") != "1"
    group = hq // hkv
    gp = group_pad(group)
    default = launch_defaults(cache.key_bits, bsz * hkv, cache.n_quant)
    if block_n is None:
        block_n = default["block_n"]
        block_n = min(block_n, cache.group) if cache.key_per_channel else block_n
    num_warps = num_warps or default["num_warps"]
    num_stages = num_stages or 3
    res_stages = res_stages or default["res_stages"]
    waves = waves or default["waves"]
    maxnreg = default["maxnreg"] if maxnreg is None else maxnreg  # 0: no cap
    residual_split = default["residual_split"] if residual_split is None else residual_split
    overlap = default["overlap"] if overlap is None else overlap
    fold_per_group = default["fold_per_group"] if fold_per_group is None else fold_per_group
    if cache.key_per_channel and cache.group % block_n:
        raise ValueError(f"block_n {block_n} must divide the quantisation group {cache.group}")
    if split_len is None:
        split_len = plan_splits(
            max(cache.n_quant, 1), bsz * hkv, block_n, q.device, waves, min_split=256
        )
    # the residual's own split starts past the codes, so its loop over codes is empty
    n_splits = math.ceil(cache.n_quant / split_len) + int(residual_split and cache.n_residual > 0)
    n_splits = max(1, n_splits)
    q = q.contiguous()
    kc, kc_bh = _per_bh(cache.key_codes.view(torch.int16))  # read as 16-bit words
    ks, ks_bh = _per_bh(cache.key_scale)
    kz, kz_bh = _per_bh(cache.key_zero)
    vc, vc_bh = _per_bh(cache.value_codes.view(torch.int16))
    vs, vs_bh = _per_bh(cache.value_scale)
    vz, vz_bh = _per_bh(cache.value_zero)
    rk, rk_bh = _per_bh(cache.residual_keys)
    rv, rv_bh = _per_bh(cache.residual_values)
    if kz_bh != ks_bh or vz_bh != vs_bh:
        raise ValueError("scales and zero points must share a layout")
    o_part, l_part = partial_buffers(bsz, hkv, n_splits, gp, d, q.device)
    _quant_decode_split[(bsz * hkv, n_splits)](
        q, kc, ks, kz, vc, vs, vz, rk, rv, o_part, l_part,
        q.stride(0), q.stride(1), kc_bh, ks_bh, vc_bh, vs_bh, rk_bh, rv_bh,
        hkv, n_splits, split_len, cache.n_quant, cache.n_residual, scale * LOG2E,
        l_part if lengths is None else lengths,
        GROUP=group, GP=gp, D=d, BLOCK_N=block_n, KBITS=cache.key_bits, VBITS=cache.value_bits,
        QGROUP=cache.group, PER_CHANNEL=cache.key_per_channel, FAST=fast_unpack,
        RES_STAGES=res_stages, OVERLAP=overlap,
        FOLD_PER_GROUP=fold_per_group, DEVICE_LEN=lengths is not None,
        num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )  # fmt: skip
    return combine_splits(o_part, l_part, bsz, hq, group, n_splits, d, q.dtype)


def dequantize_cache(cache: QuantKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, H, n_quant + n_residual, D] in ``dtype``: codes dequantised in
    float32 (code * scale + zero) then rounded to ``dtype``, followed by the residual."""
    n, d = cache.n_quant, cache.head_dim
    kc = unpack_words(cache.key_codes[:, :, :n], cache.key_bits, torch.float32)
    if cache.key_per_channel:
        b, h = kc.shape[:2]
        g = n // cache.group
        kc = kc.view(b, h, g, cache.group, d)
        ks = cache.key_scale[:, :, :g, None].float()
        kz = cache.key_zero[:, :, :g, None].float()
        k = (kc * ks + kz).view(b, h, n, d)
    else:
        k = kc * cache.key_scale[:, :, :n, None].float() + cache.key_zero[:, :, :n, None].float()
    vc = unpack_words(cache.value_codes[:, :, :n], cache.value_bits, torch.float32)
    v = vc * cache.value_scale[:, :, :n, None].float() + cache.value_zero[:, :, :n, None].float()
    r = cache.n_residual
    keys = torch.cat([k.to(dtype), cache.residual_keys[:, :, :r].to(dtype)], 2)
    values = torch.cat([v.to(dtype), cache.residual_values[:, :, :r].to(dtype)], 2)
    return keys, values


def quant_decode_reference(q: torch.Tensor, cache: QuantKV, *, scale: float) -> torch.Tensor:
    """Dequantise everything (``dequantize_cache``) then exact attention per KV head."""
    keys, values = dequantize_cache(cache, q.dtype)
    bsz, hq, d = q.shape
    hkv = keys.shape[1]
    out = torch.empty(bsz, hq, d, dtype=torch.float32, device=q.device)
    for b in range(bsz):  # every KV head holds every token: one batched product per sequence
        out[b] = attend_heads(q[b].view(hkv, hq // hkv, d), keys[b], values[b], scale).view(hq, d)
    return out.to(q.dtype)


def kernel_applies(q: torch.Tensor, cache: QuantKV) -> bool:
    """CUDA; head dim a power of two whose channel blocks (D * bits / 16 channels per field)
    are >= 16 wide for tl.dot; per-channel groups a power of two >= 16."""
    d = cache.head_dim
    blocks_ok = all(d * bits // 16 >= 16 for bits in (cache.key_bits, cache.value_bits))
    group_ok = not cache.key_per_channel or (
        cache.group >= 16 and cache.group & (cache.group - 1) == 0
    )
    return (
        q.is_cuda and triton is not None and d & (d - 1) == 0 and d >= 16 and blocks_ok and group_ok
    )


def quant_decode(q: torch.Tensor, cache: QuantKV, *, scale: float) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA where it applies, the reference elsewhere."""
    if kernel_applies(q, cache):
        with torch.cuda.device(q.device):
            return quant_decode_triton(q, cache, scale=scale)
    return quant_decode_reference(q, cache, scale=scale)
