"""Single-token decode attention over an evicted cache stored compactly, per KV head.

Layout: keys/values [B, Hkv, C, D] buffers of capacity C where KV head (b, h) holds its kept
tokens in rows [0, lengths[b, h]) (different heads may keep different numbers of tokens;
rows past the length are never read); queries [B, Hq, D] with query head j reading KV head
j // (Hq // Hkv). Split over the sequence (flash-decoding): each program takes one (batch,
KV head, split), runs the online softmax for all query heads of the group over its slice of
the kept rows, and writes a partial output and log-sum-exp; a second step combines splits.

File order: kernel -> launcher -> reference -> dispatcher. The reference is what the CPU path
runs; on CUDA the dispatcher launches the kernel.
"""

from __future__ import annotations

import math

import torch

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


if triton is not None:

    @triton.jit
    def _sparse_decode_split(
        Q, K, V, LENGTHS, O_PART, L_PART,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
        H_KV, N_SPLITS, SPLIT_LEN, scale_log2,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_KV
        h = pid_bh % H_KV
        length = tl.load(LENGTHS + pid_bh)
        start = split * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, length)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        g_ok = offs_g < GROUP
        q = tl.load(
            Q + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
            mask=g_ok[:, None],
            other=0.0,
        )
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        for n0 in tl.range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ok = offs_n < end
            k = tl.load(
                k_base + offs_n[:, None] * stride_kc + offs_d[None, :], mask=ok[:, None], other=0.0
            )
            s = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), 2) * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + offs_n[:, None] * stride_vc + offs_d[None, :], mask=ok[:, None], other=0.0
            )
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), 1)
            m_i = m_new
        row = (pid_bh * N_SPLITS + split) * GROUP_PAD + offs_g
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], out)
        lse2 = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(L_PART + row, lse2)


def sparse_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    split_len: int = 1024,
    block_n: int = 64,
) -> torch.Tensor:
    """Launch the split kernel, then combine the splits' partial outputs by their LSE."""
    bsz, hq, d = q.shape
    _, hkv, cap, _ = k.shape
    group = hq // hkv
    group_pad = max(1, 1 << (group - 1).bit_length())
    n_splits = max(1, math.ceil(int(lengths.max()) / split_len))
    f32 = {"device": q.device, "dtype": torch.float32}
    o_part = torch.empty(bsz * hkv * n_splits * group_pad, d, **f32)
    l_part = torch.empty(bsz * hkv * n_splits * group_pad, **f32)
    lengths_i = lengths.to(torch.int32).contiguous()
    _sparse_decode_split[(bsz * hkv, n_splits)](
        q, k, v, lengths_i, o_part, l_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        hkv, n_splits, split_len, scale * 1.4426950408889634,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=d, BLOCK_N=block_n,
    )  # fmt: skip
    o_part = o_part.view(bsz, hkv, n_splits, group_pad, d)[:, :, :, :group]
    l_part = l_part.view(bsz, hkv, n_splits, group_pad)[:, :, :, :group]
    weights = torch.softmax(l_part * math.log(2), dim=2).nan_to_num(0.0)  # over splits
    out = (o_part * weights[..., None]).sum(2)  # [B, Hkv, G, D]
    return out.reshape(bsz, hq, d).to(q.dtype)


def sparse_decode_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Exact attention of each query head over its KV head's first ``lengths`` rows."""
    bsz, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out = torch.empty(bsz, hq, d, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        for h in range(hkv):
            n = int(lengths[b, h])
            kk, vv = k[b, h, :n].float(), v[b, h, :n].float()
            qq = q[b, h * group : (h + 1) * group].float()
            p = torch.softmax(qq @ kk.T * scale, dim=-1)
            out[b, h * group : (h + 1) * group] = p @ vv
    return out.to(q.dtype)


def sparse_decode(q, k, v, lengths, *, scale: float) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere."""
    if q.is_cuda and triton is not None:
        with torch.cuda.device(q.device):  # Triton launches on the current device
            return sparse_decode_triton(q, k, v, lengths, scale=scale)
    return sparse_decode_reference(q, k, v, lengths, scale=scale)
