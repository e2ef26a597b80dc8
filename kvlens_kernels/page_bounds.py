"""Quest's page criticality: an upper bound of the best query-key score in each page of keys
(Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference").

Per page, a KV head keeps the channel-wise minimum m and maximum M of its keys. For a query q
the bound is sum_i max(q_i * m_i, q_i * M_i) >= q . k for every key k of the page. The two
terms split by the sign of q_i, so the bound is relu(q) . M + min(q, 0) . m: two products
that run on tensor cores. The query heads of a KV group share the pages a step reads, so
their bounds are pooled (max: an upper bound for every head of the group; or mean).

Layout: queries [B, Hq, D], page minima/maxima [B, Hkv, N_pages, D]; out [B, Hkv, N_pages]
float32. File order: kernel -> launcher -> reference -> dispatcher.
"""

from __future__ import annotations

import torch

from kvlens_kernels.split_decode import group_pad

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

POOLS = ("max", "mean")

if triton is not None:

    @triton.jit
    def _page_bounds_kernel(
        Q, KMIN, KMAX, OUT,
        stride_qb, stride_qh, stride_mb, stride_mh, stride_mp,
        H_KV, N_PAGES,
        GROUP: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
        POOL_MAX: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        p0 = tl.program_id(1) * BLOCK_P
        b = pid_bh // H_KV
        h = pid_bh % H_KV
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_p = p0 + tl.arange(0, BLOCK_P)
        real = offs_g < GROUP
        q = tl.load(
            Q + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
            mask=real[:, None],
            other=0.0,
        )
        ok = offs_p < N_PAGES
        base = b * stride_mb + h * stride_mh + offs_p[:, None] * stride_mp + offs_d[None, :]
        mn = tl.load(KMIN + base, mask=ok[:, None], other=0.0)
        mx = tl.load(KMAX + base, mask=ok[:, None], other=0.0)
        zero = tl.zeros_like(q)
        pos = tl.maximum(q, zero)
        neg = tl.minimum(q, zero)
        s = tl.dot(pos, tl.trans(mx)) + tl.dot(neg, tl.trans(mn))  # [GP, BLOCK_P]
        if POOL_MAX:
            pooled = tl.max(tl.where(real[:, None], s, float("-inf")), 0)
        else:
            pooled = tl.sum(tl.where(real[:, None], s, 0.0), 0) / GROUP
        tl.store(OUT + pid_bh * N_PAGES + offs_p, pooled, mask=ok)


def page_bounds_triton(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *, pool: str = "max",
    block_p: int = 64, num_warps: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Launch one program per (batch, KV head, block of pages)."""
    bsz, hq, d = q.shape
    _, hkv, n_pages, _ = kmin.shape
    group = hq // hkv
    out = torch.empty(bsz, hkv, n_pages, device=q.device, dtype=torch.float32)
    kmin, kmax = kmin.contiguous(), kmax.contiguous()
    extra = {} if num_warps is None or q.device.type == "cpu" else {"num_warps": num_warps}
    _page_bounds_kernel[(bsz * hkv, triton.cdiv(n_pages, block_p))](
        q, kmin, kmax, out,
        q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), kmin.stride(2),
        hkv, n_pages,
        GROUP=group, GP=group_pad(group), HEAD_DIM=d, BLOCK_P=block_p,
        POOL_MAX=pool == "max", **extra,
    )  # fmt: skip
    return out


def page_bounds_reference(
    q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, *, pool: str = "max"
) -> torch.Tensor:
    """The bound as the paper writes it, sum_i max(q_i m_i, q_i M_i), in float32, pooled
    over each KV group's query heads."""
    bsz, hq, d = q.shape
    hkv = kmin.shape[1]
    qg = q.float().reshape(bsz, hkv, hq // hkv, 1, d)
    lo, hi = kmin.float()[:, :, None], kmax.float()[:, :, None]  # [B, Hkv, 1, P, D]
    bound = torch.maximum(qg * lo, qg * hi).sum(-1)  # [B, Hkv, G, P]
    return bound.amax(2) if pool == "max" else bound.mean(2)


def kernel_applies(q: torch.Tensor, head_dim: int) -> bool:
    """The Triton path needs CUDA and a power-of-two head dimension of at least 16."""
    return q.is_cuda and triton is not None and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def page_bounds(q, kmin, kmax, *, pool: str = "max") -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere."""
    if kernel_applies(q, q.shape[-1]):
        with torch.cuda.device(q.device):
            return page_bounds_triton(q, kmin, kmax, pool=pool)
    return page_bounds_reference(q, kmin, kmax, pool=pool)
