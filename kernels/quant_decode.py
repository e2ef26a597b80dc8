"""Single-token decode attention over a KIVI-layout quantised cache, read in its packed form.

Layout (``QuantKV``, batch-first, per KV head): the oldest ``n_quant`` tokens as packed codes
(``kernels.quantize``: keys per channel over groups of ``group`` tokens, or per token; values
per token; 2, 4 or 8 bits, fp16 scales and zero points), then ``n_residual`` newest tokens in
full precision. One program per (batch, KV head, split) holds all query heads of the group.

How the packed codes are read without unpacking them into channel order: codes are packed
along channels, so part i of a byte (bits i*b .. i*b+b-1) holds channels i, i + 8/b, ... in
stride 8/b. The kernel loads the query in the same strided parts and, per part, multiplies
``q_part * key_scale_part`` by the raw codes on tensor cores (for per-channel keys the group's
scale and zero fold into the query; the zero point adds sum(q * zero) to every score). Values
fold their per-token scale into the probabilities: out_part += (p * value_scale) @ codes_part,
and sum(p * value_zero) is added to every channel. Parts are joined back into channel order
once per program. The residual is the last segment of the same online softmax, read by the
last split. Splits are combined by ``kernels.split_decode``.

File order: kernel -> launcher -> reference -> dispatcher.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from kernels.quantize import QuantBlocks
from kernels.split_decode import (
    LOG2E,
    attend_rows,
    combine_splits,
    group_pad,
    partial_buffers,
    plan_splits,
)

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    from kernels.split_decode import softmax_block, store_partial
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


@dataclass
class QuantKV:
    """A quantised KV cache in the decode kernel's layout ([B, H, ...] tensors)."""

    key_codes: torch.Tensor  # uint8 [B, H, C, D*kb/8]
    key_scale: torch.Tensor  # fp16 [B, H, C/group, D] per channel, or [B, H, C] per token
    key_zero: torch.Tensor
    value_codes: torch.Tensor  # uint8 [B, H, C, D*vb/8]
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
        """A cache from ``kernels.quantize`` output for B x H rows ([B*H, n, ...], all in use)
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


def _unpack_asm(shift: int, mask: int) -> str:
    """PTX: four packed bytes -> four float16 codes (byte >> shift) & mask, two per register.

    Each byte goes to the low half of a 16-bit lane, is shifted and masked, and ORed into the
    mantissa of 1024.0 (0x6400); subtracting 1024.0 leaves the code exactly."""
    lane_mask = mask | (mask << 16)
    shift_ops = f"shr.b32 t0, t0, {shift}; shr.b32 t1, t1, {shift};" if shift else ""
    return (
        "{ .reg .b32 t0, t1, zero, bias; mov.b32 zero, 0; mov.b32 bias, 0x64006400;"
        " prmt.b32 t0, $2, zero, 0x4140; prmt.b32 t1, $2, zero, 0x4342;"
        f" {shift_ops}"
        f" and.b32 t0, t0, {lane_mask:#010x}; and.b32 t1, t1, {lane_mask:#010x};"
        " or.b32 t0, t0, bias; or.b32 t1, t1, bias;"
        " sub.f16x2 $0, t0, bias; sub.f16x2 $1, t1, bias; }"
    )


if triton is not None:
    _UNPACK_ASM_8_0 = tl.constexpr(_unpack_asm(0, 0xFF))
    _UNPACK_ASM_4_0 = tl.constexpr(_unpack_asm(0, 0xF))
    _UNPACK_ASM_4_1 = tl.constexpr(_unpack_asm(4, 0xF))
    _UNPACK_ASM_2_0 = tl.constexpr(_unpack_asm(0, 0x3))
    _UNPACK_ASM_2_1 = tl.constexpr(_unpack_asm(2, 0x3))
    _UNPACK_ASM_2_2 = tl.constexpr(_unpack_asm(4, 0x3))
    _UNPACK_ASM_2_3 = tl.constexpr(_unpack_asm(6, 0x3))

    @triton.jit
    def _load_part(ptr, offs_g, row_ok, offs_p, D: tl.constexpr, PARTS: tl.constexpr, PART: tl.constexpr):  # fmt: skip
        """Rows [GP] of a [*, D] matrix, channels PART, PART + PARTS, PART + 2 PARTS, ... as float32."""
        return tl.load(
            ptr + offs_g[:, None] * D + (offs_p * PARTS + PART)[None, :],
            mask=row_ok[:, None],
            other=0.0,
        ).to(tl.float32)

    @triton.jit
    def _unpack_ptx(packed, asm: tl.constexpr):
        return tl.inline_asm_elementwise(
            asm, "=r,=r,r", [packed], dtype=tl.float16, is_pure=True, pack=4
        )

    @triton.jit
    def _codes(packed, PART: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr):
        """Codes in bits PART*BITS .. of each byte, as float16 values 0 .. 2^BITS - 1."""
        if FAST:  # four bytes per instruction group, no integer-to-float conversions
            if BITS == 8:
                codes = _unpack_ptx(packed, _UNPACK_ASM_8_0)
            elif BITS == 4 and PART == 0:
                codes = _unpack_ptx(packed, _UNPACK_ASM_4_0)
            elif BITS == 4:
                codes = _unpack_ptx(packed, _UNPACK_ASM_4_1)
            elif PART == 0:
                codes = _unpack_ptx(packed, _UNPACK_ASM_2_0)
            elif PART == 1:
                codes = _unpack_ptx(packed, _UNPACK_ASM_2_1)
            elif PART == 2:
                codes = _unpack_ptx(packed, _UNPACK_ASM_2_2)
            else:
                codes = _unpack_ptx(packed, _UNPACK_ASM_2_3)
        else:
            codes = ((packed >> (PART * BITS)) & ((1 << BITS) - 1)).to(tl.float16)
        return codes

    @triton.jit
    def _key_part(qi, kc, srow, zrow, offs_p, PARTS: tl.constexpr, PART: tl.constexpr,
                  BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, FAST: tl.constexpr):  # fmt: skip
        """Scores of one channel part and (per channel) its zero-point term."""
        codes = _codes(kc, PART, BITS, FAST)
        if PER_CHANNEL:
            sc = tl.load(srow + offs_p * PARTS + PART).to(tl.float32)
            zc = tl.load(zrow + offs_p * PARTS + PART).to(tl.float32)
            s = tl.dot((qi * sc[None, :]).to(tl.float16), tl.trans(codes))
            z = tl.sum(qi * zc[None, :], 1)
        else:
            s = tl.dot(qi.to(tl.float16), tl.trans(codes))
            z = tl.sum(qi, 1)  # times each token's zero, applied by the caller
        return s, z

    @triton.jit
    def _value_part(pv, vc, PART: tl.constexpr, BITS: tl.constexpr, FAST: tl.constexpr):
        return tl.dot(pv, _codes(vc, PART, BITS, FAST))

    @triton.jit
    def _quant_decode_split(
        Q, KC, KS, KZ, VC, VS, VZ, RK, RV, O_PART, L_PART,
        stride_qb, stride_qh, kc_bh, ks_bh, vc_bh, vs_bh, rk_bh, rv_bh,
        H_KV, N_SPLITS, SPLIT_LEN, N_QUANT, N_RES, scale_log2,
        GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        KBITS: tl.constexpr, VBITS: tl.constexpr, QGROUP: tl.constexpr,
        PER_CHANNEL: tl.constexpr, FAST: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_KV
        h = pid_bh % H_KV
        KP: tl.constexpr = 8 // KBITS
        VP: tl.constexpr = 8 // VBITS
        DK: tl.constexpr = D // KP
        DV: tl.constexpr = D // VP
        offs_g = tl.arange(0, GP)
        row_ok = offs_g < GROUP
        offs_k = tl.arange(0, DK)
        offs_v = tl.arange(0, DV)
        offs_d = tl.arange(0, D)
        q_ptr = Q + b * stride_qb + h * GROUP * stride_qh
        # the query in the keys' channel parts (stride_qh == D: the launcher makes q contiguous)
        q0 = _load_part(q_ptr, offs_g, row_ok, offs_k, D, KP, 0)
        if KP >= 2:
            q1 = _load_part(q_ptr, offs_g, row_ok, offs_k, D, KP, 1)
        if KP >= 4:
            q2 = _load_part(q_ptr, offs_g, row_ok, offs_k, D, KP, 2)
            q3 = _load_part(q_ptr, offs_g, row_ok, offs_k, D, KP, 3)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        a0 = tl.zeros([GP, DV], tl.float32)
        a1 = tl.zeros([GP, DV], tl.float32)
        a2 = tl.zeros([GP, DV], tl.float32)
        a3 = tl.zeros([GP, DV], tl.float32)
        az = tl.zeros([GP], tl.float32)  # sum of p * value zero point, added to every channel
        start = split * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, N_QUANT)
        kc_base = KC + pid_bh * kc_bh
        vc_base = VC + pid_bh * vc_bh
        for n0 in tl.range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ok = offs_n < end
            kc = tl.load(
                kc_base + offs_n[:, None] * DK + offs_k[None, :], mask=ok[:, None], other=0
            )
            srow = KS + pid_bh * ks_bh + (n0 // QGROUP) * D
            zrow = KZ + pid_bh * ks_bh + (n0 // QGROUP) * D
            s, z = _key_part(q0, kc, srow, zrow, offs_k, KP, 0, KBITS, PER_CHANNEL, FAST)
            if KP >= 2:
                s1, z1 = _key_part(q1, kc, srow, zrow, offs_k, KP, 1, KBITS, PER_CHANNEL, FAST)
                s += s1
                z += z1
            if KP >= 4:
                s2, z2 = _key_part(q2, kc, srow, zrow, offs_k, KP, 2, KBITS, PER_CHANNEL, FAST)
                s3, z3 = _key_part(q3, kc, srow, zrow, offs_k, KP, 3, KBITS, PER_CHANNEL, FAST)
                s += s2 + s3
                z += z2 + z3
            if PER_CHANNEL:
                s = s + z[:, None]
            else:
                ks = tl.load(KS + pid_bh * ks_bh + offs_n, mask=ok, other=0.0).to(tl.float32)
                kz = tl.load(KZ + pid_bh * ks_bh + offs_n, mask=ok, other=0.0).to(tl.float32)
                s = s * ks[None, :] + z[:, None] * kz[None, :]
            s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            vs = tl.load(VS + pid_bh * vs_bh + offs_n, mask=ok, other=0.0).to(tl.float32)
            vz = tl.load(VZ + pid_bh * vs_bh + offs_n, mask=ok, other=0.0).to(tl.float32)
            vc = tl.load(
                vc_base + offs_n[:, None] * DV + offs_v[None, :], mask=ok[:, None], other=0
            )
            pv = (p * vs[None, :]).to(tl.float16)
            az = az * alpha + tl.sum(p * vz[None, :], 1)
            a0 = a0 * alpha[:, None] + _value_part(pv, vc, 0, VBITS, FAST)
            if VP >= 2:
                a1 = a1 * alpha[:, None] + _value_part(pv, vc, 1, VBITS, FAST)
            if VP >= 4:
                a2 = a2 * alpha[:, None] + _value_part(pv, vc, 2, VBITS, FAST)
                a3 = a3 * alpha[:, None] + _value_part(pv, vc, 3, VBITS, FAST)
        # back to channel order: part i holds channels i, i + VP, ...
        if VP == 1:
            acc = a0
        elif VP == 2:
            acc = tl.reshape(tl.join(a0, a1), [GP, D])
        else:
            acc = tl.reshape(tl.join(tl.join(a0, a2), tl.join(a1, a3)), [GP, D])
        acc += az[:, None]
        # the full-precision residual: the last segment, read by the last split
        res_end = tl.where(split == N_SPLITS - 1, N_RES, 0)
        q = tl.load(
            q_ptr + offs_g[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        for n0 in tl.range(0, res_end, BLOCK_N):
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


def quant_decode_triton(
    q: torch.Tensor, cache: QuantKV, *, scale: float, split_len: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int = 2,
    fast_unpack: bool | None = None, waves: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """q [B, Hq, D] -> [B, Hq, D]: the split kernel, then the LSE combine."""
    bsz, hq, d = q.shape
    hkv = cache.key_codes.shape[1]
    if fast_unpack is None:  # PTX unpacking on the GPU; plain shifts in the interpreter
        fast_unpack = os.environ.get("TRITON_INTERPRET") != "1"
    group = hq // hkv
    gp = group_pad(group)
    # defaults measured on an H100 at 8k-128k, batch 1 and 8 (benchmarks/RESULTS.md): 2-bit
    # codes like 128-token tiles, 4 warps and 8 waves of splits; 4- and 8-bit codes 64-token
    # tiles, 2 warps, and 4 waves for a few (batch x KV head) rows, 16 for many (a grid just
    # over one wave of resident programs leaves a slow tail); splits of at least 256 tokens
    # (shorter ones cost more to combine than they gain)
    two_bit = cache.key_bits == 2
    if block_n is None:
        block_n = 128 if two_bit else 64
        block_n = min(block_n, cache.group) if cache.key_per_channel else block_n
    num_warps = num_warps or (4 if two_bit else 2)
    waves = waves or (8 if two_bit else 4 if bsz * hkv < 32 else 16)
    if cache.key_per_channel and cache.group % block_n:
        raise ValueError(f"block_n {block_n} must divide the quantisation group {cache.group}")
    if split_len is None:
        split_len = plan_splits(
            max(cache.n_quant, 1), bsz * hkv, block_n, q.device, waves, min_split=256
        )
    n_splits = max(1, math.ceil(cache.n_quant / split_len))
    q = q.contiguous()
    kc, kc_bh = _per_bh(cache.key_codes)
    ks, ks_bh = _per_bh(cache.key_scale)
    kz, kz_bh = _per_bh(cache.key_zero)
    vc, vc_bh = _per_bh(cache.value_codes)
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
        GROUP=group, GP=gp, D=d, BLOCK_N=block_n, KBITS=cache.key_bits, VBITS=cache.value_bits,
        QGROUP=cache.group, PER_CHANNEL=cache.key_per_channel, FAST=fast_unpack,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return combine_splits(o_part, l_part, bsz, hq, group, n_splits, d, q.dtype)


def dequantize_cache(cache: QuantKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, H, n_quant + n_residual, D] in ``dtype``: codes dequantised in
    float32 (code * scale + zero) then rounded to ``dtype``, followed by the residual."""
    from methods.quant import unpack

    n, d = cache.n_quant, cache.head_dim
    kc = unpack(cache.key_codes[:, :, :n], cache.key_bits, d).float()
    if cache.key_per_channel:
        b, h = kc.shape[:2]
        g = n // cache.group
        kc = kc.view(b, h, g, cache.group, d)
        ks = cache.key_scale[:, :, :g, None].float()
        kz = cache.key_zero[:, :, :g, None].float()
        k = (kc * ks + kz).view(b, h, n, d)
    else:
        k = kc * cache.key_scale[:, :, :n, None].float() + cache.key_zero[:, :, :n, None].float()
    vc = unpack(cache.value_codes[:, :, :n], cache.value_bits, d).float()
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
    group = hq // hkv
    out = torch.empty(bsz, hq, d, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        for h in range(hkv):
            rows = slice(h * group, (h + 1) * group)
            out[b, rows] = attend_rows(q[b, rows], keys[b, h], values[b, h], scale)
    return out.to(q.dtype)


def kernel_applies(q: torch.Tensor, cache: QuantKV) -> bool:
    """CUDA; head dim a power of two whose channel parts are >= 16 wide (tl.dot); per-channel
    groups a power of two >= 16."""
    d = cache.head_dim
    parts_ok = all(d * bits // 8 >= 16 for bits in (cache.key_bits, cache.value_bits))
    group_ok = not cache.key_per_channel or (
        cache.group >= 16 and cache.group & (cache.group - 1) == 0
    )
    return (
        q.is_cuda and triton is not None and d & (d - 1) == 0 and d >= 16 and parts_ok and group_ok
    )


def quant_decode(q: torch.Tensor, cache: QuantKV, *, scale: float) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA where it applies, the reference elsewhere."""
    if kernel_applies(q, cache):
        with torch.cuda.device(q.device):
            return quant_decode_triton(q, cache, scale=scale)
    return quant_decode_reference(q, cache, scale=scale)
