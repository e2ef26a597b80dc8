"""Single-token decode attention over an evicted cache stored compactly, per KV head.

Layout: keys/values [B, Hkv, C, D] buffers of capacity C where KV head (b, h) holds its kept
tokens in rows [0, lengths[b, h]) (different heads may keep different numbers of tokens;
rows past the length are never read); queries [B, Hq, D] with query head j reading KV head
j // (Hq // Hkv). Split over the sequence (flash-decoding, see ``kvlens_kernels.split_decode``): one
program per (batch, KV head, split) runs the online softmax for all query heads of the group
over its slice of the kept rows on tensor cores; a second kernel combines the splits.

File order: kernel -> launcher -> reference -> dispatcher. The reference is what the CPU path
runs; on CUDA the dispatcher launches the kernel.
"""

from __future__ import annotations

import math

import torch

from kvlens_kernels.split_decode import (
    LOG2E,
    attend_heads,
    attend_rows,
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


if triton is not None:

    @triton.jit
    def _sparse_decode_split(
        Q, K, V, LENGTHS, O_PART, L_PART,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
        H_KV, N_SPLITS, SPLIT_LEN, scale_log2,
        GROUP: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_KV
        h = pid_bh % H_KV
        length = tl.load(LENGTHS + pid_bh)
        start = split * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, length)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
            mask=(offs_g < GROUP)[:, None],
            other=0.0,
        )
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, HEAD_DIM], tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        for n0 in tl.range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            ok = offs_n < end
            k = tl.load(
                k_base + offs_n[:, None] * stride_kc + offs_d[None, :], mask=ok[:, None], other=0.0
            )
            v = tl.load(
                v_base + offs_n[:, None] * stride_vc + offs_d[None, :], mask=ok[:, None], other=0.0
            )
            m_i, l_i, acc = softmax_block(q, k, v, ok, m_i, l_i, acc, scale_log2)
        store_partial(O_PART, L_PART, (pid_bh * N_SPLITS + split) * GP, m_i, l_i, acc, GP, HEAD_DIM)


def sparse_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scale: float,
    split_len: int | None = None,
    block_n: int = 64,
    max_length: int | None = None,
    waves: int = 1,
) -> torch.Tensor:
    """Launch the split kernel, then combine the splits' partial outputs by their LSE.

    ``max_length`` (the longest head's length) saves a device-to-host read when known."""
    bsz, hq, d = q.shape
    _, hkv, cap, _ = k.shape
    group = hq // hkv
    gp = group_pad(group)
    longest = int(lengths.max()) if max_length is None else max_length
    if split_len is None:
        # one wave of long splits: measured fastest at batch 1 (benchmarks/RESULTS.md)
        split_len = plan_splits(longest, bsz * hkv, block_n, q.device, waves=waves)
    n_splits = max(1, math.ceil(longest / split_len))
    o_part, l_part = partial_buffers(bsz, hkv, n_splits, gp, d, q.device)
    lengths_i = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    _sparse_decode_split[(bsz * hkv, n_splits)](
        q, k, v, lengths_i, o_part, l_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        hkv, n_splits, split_len, scale * LOG2E,
        GROUP=group, GP=gp, HEAD_DIM=d, BLOCK_N=block_n,
    )  # fmt: skip
    return combine_splits(o_part, l_part, bsz, hq, group, n_splits, d, q.dtype)


def sparse_decode_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Exact attention of each query head over its KV head's first ``lengths`` rows. The KV
    heads of a sequence that hold the same number of rows attend in one batched product
    (``attend_heads``: one head at a time's numbers at the embedded models' shapes, else
    within float32 rounding)."""
    bsz, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out = torch.empty(bsz, hq, d, dtype=torch.float32, device=q.device)
    for b, row_counts in enumerate(lengths.tolist()):
        if len(set(row_counts)) == 1:
            n = row_counts[0]
            heads = attend_heads(q[b].view(hkv, group, d), k[b, :, :n], v[b, :, :n], scale)
            out[b] = heads.view(hq, d)
            continue
        for h, n in enumerate(row_counts):
            rows = slice(h * group, (h + 1) * group)
            out[b, rows] = attend_rows(q[b, rows], k[b, h, :n], v[b, h, :n], scale)
    return out.to(q.dtype)


def kernel_applies(q: torch.Tensor, head_dim: int) -> bool:
    """The Triton path needs CUDA and a power-of-two head dimension of at least 16."""
    return q.is_cuda and triton is not None and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def sparse_decode(q, k, v, lengths, *, scale: float, max_length: int | None = None) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere."""
    if kernel_applies(q, q.shape[-1]):
        with torch.cuda.device(q.device):  # Triton launches on the current device
            return sparse_decode_triton(q, k, v, lengths, scale=scale, max_length=max_length)
    return sparse_decode_reference(q, k, v, lengths, scale=scale)
