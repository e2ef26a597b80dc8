"""Single-token decode attention that reads only the selected pages of a per-head cache
(the attention half of Quest-style page-sparse decoding: Tang et al. 2024, "Quest:
Query-Aware Sparsity for Efficient Long-Context LLM Inference").

Layout: keys/values [B, Hkv, C, D] where KV head (b, h) stores its tokens in rows
[0, lengths[b, h]); the cache is cut into pages of ``page_size`` rows (page p holds rows
[p * P, (p + 1) * P), the last page may be partial). ``pages`` [B, Hkv, M] lists, per KV head,
the distinct pages a step reads in its first ``n_pages[b, h]`` entries (entries past that are
never read). Queries [B, Hq, D], query head j reading KV head j // (Hq // Hkv). A page size of 1
makes the page table a list of single rows (token-level selection, e.g. oracle top-k).

The kernel walks the *selected slots* (slot s is row pages[s // P] * P + s % P), split over
the sequence like the other decode kernels (``kvlens_kernels.split_decode``): one program per (batch,
KV head, split) runs the online softmax of every query head of the group over its slots, the
combine kernel merges the splits by their log-sum-exp. Only the selected rows are loaded.

File order: kernel -> launcher -> reference -> dispatcher.
"""

from __future__ import annotations

import math

import torch

from kvlens_kernels.split_decode import (
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

    from kvlens_kernels.split_decode import softmax_block, store_partial
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


if triton is not None:

    @triton.jit
    def attend_page_slots(
        q, k_base, v_base, p_base, start, end, length, PAGE, stride_kc, stride_vc, scale_log2,
        GP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IN_PAGE: tl.constexpr,
    ):  # fmt: skip
        """The online softmax of one query group [GP, D] over selected slots [start, end): slot
        s is row pages[s // PAGE] * PAGE + s % PAGE of the head (``p_base`` points at its page
        indices), rows at or past ``length`` skipped (a partial last page). Returns the
        unnormalised (m, l, acc) for ``split_decode.store_partial``; shared by this module's
        split kernel and ``page_step``'s fused one."""
        offs_d = tl.arange(0, HEAD_DIM)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, HEAD_DIM], tl.float32)
        for n0 in tl.range(start, end, BLOCK_N):
            slots = n0 + tl.arange(0, BLOCK_N)
            ok = slots < end
            if IN_PAGE:  # the block lies in one page: one index, contiguous rows
                page = tl.load(p_base + n0 // PAGE)
                rows = page.to(tl.int64) * PAGE + (n0 % PAGE) + tl.arange(0, BLOCK_N)
            else:
                page = tl.load(p_base + slots // PAGE, mask=ok, other=0)
                rows = page.to(tl.int64) * PAGE + slots % PAGE
            ok = ok & (rows < length)  # the last page may be partial
            k = tl.load(
                k_base + rows[:, None] * stride_kc + offs_d[None, :], mask=ok[:, None], other=0.0
            )
            v = tl.load(
                v_base + rows[:, None] * stride_vc + offs_d[None, :], mask=ok[:, None], other=0.0
            )
            m_i, l_i, acc = softmax_block(q, k, v, ok, m_i, l_i, acc, scale_log2)
        return m_i, l_i, acc

    @triton.jit
    def _page_decode_split(
        Q, K, V, LENGTHS, PAGES, N_PAGES, O_PART, L_PART,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
        stride_pb, stride_ph,
        H_KV, N_SPLITS, SPLIT_LEN, PAGE, scale_log2,
        GROUP: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        IN_PAGE: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_KV
        h = pid_bh % H_KV
        length = tl.load(LENGTHS + pid_bh)
        n_slots = tl.load(N_PAGES + pid_bh) * PAGE
        start = split * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, n_slots)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            Q + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
            mask=(offs_g < GROUP)[:, None],
            other=0.0,
        )
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        p_base = PAGES + b * stride_pb + h * stride_ph
        m_i, l_i, acc = attend_page_slots(
            q, k_base, v_base, p_base, start, end, length, PAGE, stride_kc, stride_vc, scale_log2,
            GP, HEAD_DIM, BLOCK_N, IN_PAGE,
        )  # fmt: skip
        store_partial(O_PART, L_PART, (pid_bh * N_SPLITS + split) * GP, m_i, l_i, acc, GP, HEAD_DIM)


def page_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    pages: torch.Tensor,
    n_pages: torch.Tensor,
    *,
    page_size: int,
    scale: float,
    max_pages: int | None = None,
    split_len: int | None = None,
    block_n: int | None = None,
    waves: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Launch the split kernel over the selected slots, then combine the splits.

    ``max_pages`` (the most pages any head reads) saves a device-to-host read when known, as
    it is when a step selects a fixed number of pages. When ``block_n`` divides the page size
    (and so does the split length), each block of slots lies in one page: the kernel reads one
    page index per block and contiguous rows."""
    bsz, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    gp = group_pad(group)
    most = int(n_pages.max()) if max_pages is None else max_pages
    slots = max(1, most * page_size)
    if block_n is None:  # 64 slots a block: several small pages, or one part of a large one
        block_n = 64
    if split_len is None:
        split_len = plan_splits(slots, bsz * hkv, block_n, q.device, waves=waves)
    n_splits = max(1, math.ceil(slots / split_len))
    o_part, l_part = partial_buffers(bsz, hkv, n_splits, gp, d, q.device)
    lengths_i = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    n_pages_i = n_pages.to(device=q.device, dtype=torch.int32).contiguous()
    pages_i = pages if pages.dtype in (torch.int32, torch.int64) else pages.to(torch.int32)
    pages_i = pages_i.to(q.device).contiguous()  # int64 as top-k gives it: no conversion
    in_page = page_size % block_n == 0 and split_len % block_n == 0
    extra = {} if q.device.type == "cpu" else {"num_warps": num_warps, "num_stages": num_stages}
    extra = {name: value for name, value in extra.items() if value is not None}
    _page_decode_split[(bsz * hkv, n_splits)](
        q, k, v, lengths_i, pages_i, n_pages_i, o_part, l_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        pages_i.stride(0), pages_i.stride(1),
        hkv, n_splits, split_len, page_size, scale * LOG2E,
        GROUP=group, GP=gp, HEAD_DIM=d, BLOCK_N=block_n, IN_PAGE=in_page, **extra,
    )  # fmt: skip
    return combine_splits(o_part, l_part, bsz, hq, group, n_splits, d, q.dtype)


def selected_rows(pages: torch.Tensor, page_size: int, length: int) -> torch.Tensor:
    """Row indices (int64, in page order) that a list of pages covers in a head of ``length``
    rows: the slots the kernel walks."""
    offs = torch.arange(page_size, device=pages.device)
    rows = (pages.to(torch.int64)[:, None] * page_size + offs[None, :]).reshape(-1)
    return rows[rows < length]


def page_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    pages: torch.Tensor,
    n_pages: torch.Tensor,
    *,
    page_size: int,
    scale: float,
) -> torch.Tensor:
    """Exact attention of each query head over the rows of its KV head's selected pages,
    gathered first; a head that reads no row gives zeros (as the kernel does)."""
    bsz, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    out = torch.zeros(bsz, hq, d, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        for h in range(hkv):
            chosen = pages[b, h, : int(n_pages[b, h])]
            rows = selected_rows(chosen, page_size, int(lengths[b, h]))
            if rows.numel():
                g = slice(h * group, (h + 1) * group)
                out[b, g] = attend_rows(q[b, g], k[b, h, rows], v[b, h, rows], scale)
    return out.to(q.dtype)


def kernel_applies(q: torch.Tensor, head_dim: int) -> bool:
    """The Triton path needs CUDA and a power-of-two head dimension of at least 16."""
    return q.is_cuda and triton is not None and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def page_decode(
    q, k, v, lengths, pages, n_pages, *, page_size: int, scale: float, max_pages: int | None = None
) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere."""
    if kernel_applies(q, q.shape[-1]):
        with torch.cuda.device(q.device):  # Triton launches on the current device
            return page_decode_triton(
                q, k, v, lengths, pages, n_pages,
                page_size=page_size, scale=scale, max_pages=max_pages,
            )  # fmt: skip
    return page_decode_reference(q, k, v, lengths, pages, n_pages, page_size=page_size, scale=scale)
