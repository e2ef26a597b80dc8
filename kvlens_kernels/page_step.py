"""One Quest-style page-sparse decode step in two launches (Tang et al. 2024, "Quest:
Query-Aware Sparsity for Efficient Long-Context LLM Inference"): the page bounds, the top pages
per KV head and the attention over just those pages, the splits combined in the same launch.

The three-launch step (``page_bounds`` -> ``page_select`` -> ``page_decode``, plus
``page_decode``'s combine) is latency-bound at batch 1: 8 KV heads, each launch a few
microseconds above its bytes. Here:

1. launch A is ``kvlens_kernels.page_bounds`` itself (one program per (batch, KV head, block of
   pages)): float32 bounds [B, Hkv, N], the same numbers the three-launch step ranks;
2. launch B runs one program per (batch, KV head, split). Each program loads its head's whole
   row of bounds (N floats, from L2) and finds the chosen pages with ``page_select``'s own
   rule (``page_select.choose_pages``, shared by both steps: the search for the k-th largest
   bound over integer keys, ties to the lowest indices, ``force_last``), ranks them in ascending index order (a prefix
   sum), and writes the page indices of its own split's slots into ``pages``. The selected slots
   (slot s is row pages[s // P] * P + s % P) are cut into splits as ``page_decode`` cuts them;
   after a barrier the program reads its page indices back and runs the online softmax of the
   whole query group over its slots (``split_decode.softmax_block``), then writes its partial
   output and log-sum-exp. The last program of a head to finish (an atomic counter per head)
   combines the head's partials by their log-sum-exp and writes the output, then resets the
   counter to zero, so no third launch merges the splits.

Every program of a head repeats the selection (the row is a few KB from L2); that buys the split
attention without a launch between choosing and reading. The result is the three-launch step's:
the same pages as ``page_select_triton`` over ``page_bounds_triton``'s bounds, and the attention
of ``page_decode_reference`` over them.

Layout: queries [B, Hq, D] (query head j reads KV head j // (Hq // Hkv)); keys/values
[B, Hkv, C, D], head (b, h) holding its tokens in rows [0, lengths[b, h]); page summaries
kmin/kmax [B, Hkv, N, D] (channel-wise minimum / maximum of each page of ``page_size`` rows; the
last page may be partial: its rows at or past the length are never read). Every head has N
pages to rank and reads min(n_select, N) of them.

File order: kernel -> launcher -> reference -> dispatcher.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kvlens_kernels.page_bounds import page_bounds, page_bounds_reference, page_bounds_triton
from kvlens_kernels.page_decode import page_decode, page_decode_reference
from kvlens_kernels.page_select import (
    MAX_PAGES,
    page_select,
    page_select_reference,
    select_warps,
)
from kvlens_kernels.split_decode import LOG2E, group_pad, partial_buffers, plan_splits

try:  # Triton is optional on CPU-only installs
    import triton
    import triton.language as tl

    from kvlens_kernels.page_decode import attend_page_slots
    from kvlens_kernels.page_select import choose_pages
    from kvlens_kernels.split_decode import store_partial
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None


class PageStep(NamedTuple):
    """What one step returns: ``out`` [B, Hq, D] in the queries' dtype; ``pages`` int32
    [B, Hkv, min(n_select, N)], each KV head's chosen pages in ascending index order (the rows
    read are these pages' rows below the head's length); ``bounds`` float32 [B, Hkv, N], the
    Quest bound of every page, pooled over the query group."""

    out: torch.Tensor
    pages: torch.Tensor
    bounds: torch.Tensor


if triton is not None:

    @triton.jit
    def _page_step_kernel(
        Q, K, V, LENGTHS, BOUNDS, PAGES, O_PART, L_PART, COUNTERS, OUT,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
        H_KV, N, KK, N_SPLITS, SPLIT_LEN, PAGE, scale_log2,
        GROUP: tl.constexpr, GP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_PAGES: tl.constexpr, PROBES: tl.constexpr, CHUNK: tl.constexpr,
        IN_PAGE: tl.constexpr, FORCE_LAST: tl.constexpr,
    ):  # fmt: skip
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // H_KV
        h = pid_bh % H_KV
        # the chosen pages of this head; this split's slots [start, end) lie in page slots
        # [start // PAGE, (end - 1) // PAGE], which this program writes (a page across two
        # splits is written by both, the same index)
        offs_p = tl.arange(0, BLOCK_PAGES)
        x = tl.load(BOUNDS + pid_bh.to(tl.int64) * N + offs_p, mask=offs_p < N, other=0.0)
        chosen, slot = choose_pages(x, offs_p, N, KK, PROBES, FORCE_LAST)
        start = split * SPLIT_LEN
        end = tl.minimum(start + SPLIT_LEN, KK * PAGE)
        mine = chosen & (slot >= start // PAGE) & (slot <= (end - 1) // PAGE)
        p_base = PAGES + pid_bh.to(tl.int64) * KK
        tl.store(p_base + slot, offs_p, mask=mine)
        tl.debug_barrier()  # the indices are read back below by other threads of this program
        # attention over the split's slots, as kvlens_kernels.page_decode walks them
        length = tl.load(LENGTHS + pid_bh)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, HEAD_DIM)
        real = offs_g < GROUP
        q = tl.load(
            Q + b * stride_qb + (h * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
            mask=real[:, None],
            other=0.0,
        )
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        m_i, l_i, acc = attend_page_slots(
            q, k_base, v_base, p_base, start, end, length, PAGE, stride_kc, stride_vc, scale_log2,
            GP, HEAD_DIM, BLOCK_N, IN_PAGE,
        )  # fmt: skip
        row0 = pid_bh * N_SPLITS * GP
        store_partial(O_PART, L_PART, row0 + split * GP, m_i, l_i, acc, GP, HEAD_DIM)
        # every thread's partial is written before the counter moves (release), and the last
        # program reads the others' partials after it (acquire, and past L1: .cg)
        tl.debug_barrier()
        finished = tl.atomic_add(COUNTERS + pid_bh, 1, sem="acq_rel", scope="gpu")
        if finished == N_SPLITS - 1:
            offs_c = tl.arange(0, CHUNK)
            m = tl.full([GP], float("-inf"), tl.float32)
            total = tl.zeros([GP], tl.float32)
            out = tl.zeros([GP, HEAD_DIM], tl.float32)
            for s0 in range(0, N_SPLITS, CHUNK):  # an online softmax over the splits
                ok_c = (s0 + offs_c) < N_SPLITS
                rows_c = row0 + (s0 + offs_c)[:, None] * GP + offs_g[None, :]  # [CHUNK, GP]
                lse = tl.load(
                    L_PART + rows_c, mask=ok_c[:, None], other=float("-inf"), cache_modifier=".cg"
                )
                o = tl.load(
                    O_PART + rows_c[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=ok_c[:, None, None],
                    other=0.0,
                    cache_modifier=".cg",
                )
                m_new = tl.maximum(m, tl.max(lse, 0))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m - m_safe)
                w = tl.exp2(lse - m_safe[None, :])
                total = total * alpha + tl.sum(w, 0)
                out = out * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
                m = m_new
            total = tl.where(total > 0, total, 1.0)  # a head that read no row: zeros
            out_rows = b * H_KV * GROUP + h * GROUP + offs_g
            tl.store(
                OUT + out_rows[:, None] * HEAD_DIM + offs_d[None, :],
                (out / total[:, None]).to(OUT.dtype.element_ty),
                mask=real[:, None],
            )
            tl.store(COUNTERS + pid_bh, 0)  # ready for the next step (a CUDA graph's replay)


def step_counters(bsz: int, hkv: int, device: torch.device | str) -> torch.Tensor:
    """The zeroed int32 counters [B * Hkv] the step's launch B needs; every launch leaves them
    zero again, so one buffer serves any number of steps issued one after another on one
    stream (two steps running at once need two buffers)."""
    return torch.zeros(bsz * hkv, device=device, dtype=torch.int32)


def page_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    n_select: int,
    *,
    page_size: int,
    scale: float,
    pool: str = "max",
    force_last: bool = False,
    counters: torch.Tensor | None = None,
    probes: int = 4,
    block_p: int = 64,
    split_len: int | None = None,
    block_n: int | None = None,
    waves: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> PageStep:
    """Launch A (``page_bounds_triton``) and launch B (choose, attend, combine); see the module
    docstring. ``counters`` (from ``step_counters``, zeros) keeps the step at two launches;
    without it a zeroed buffer is allocated (one fill more). Rows with more than
    ``page_select.MAX_PAGES`` pages are refused (the dispatcher composes the three-launch step
    for them). ``split_len`` / ``block_n`` / ``waves`` cut the slots as ``page_decode_triton``
    does; ``num_warps`` defaults to what the selection of a row of N pages wants."""
    bsz, hq, d = q.shape
    _, hkv, n, _ = kmin.shape
    if n > MAX_PAGES:
        raise ValueError(f"{n} pages per head: the fused step holds at most {MAX_PAGES}")
    kk = min(n_select, n)
    group = hq // hkv
    gp = group_pad(group)
    bounds = page_bounds_triton(q, kmin, kmax, pool=pool, block_p=block_p, num_warps=None)
    pages = torch.empty(bsz, hkv, kk, device=q.device, dtype=torch.int32)
    if bsz * hkv == 0 or kk == 0:  # nothing read: zeros, as page_decode_reference gives
        return PageStep(torch.zeros(bsz, hq, d, device=q.device, dtype=q.dtype), pages, bounds)
    if counters is None:
        counters = step_counters(bsz, hkv, q.device)
    elif counters.dtype != torch.int32 or counters.numel() < bsz * hkv:
        raise ValueError(f"counters must be int32 with at least {bsz * hkv} zeros")
    block_n = 64 if block_n is None else block_n
    slots = kk * page_size
    if split_len is None:
        split_len = plan_splits(slots, bsz * hkv, block_n, q.device, waves=waves)
    n_splits = math.ceil(slots / split_len)
    o_part, l_part = partial_buffers(bsz, hkv, n_splits, gp, d, q.device)
    out = torch.empty(bsz, hq, d, device=q.device, dtype=q.dtype)
    lengths_i = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    block_pages = max(16, triton.next_power_of_2(n))
    in_page = page_size % block_n == 0 and split_len % block_n == 0
    extra = {}
    if q.device.type != "cpu":
        extra = {"num_warps": num_warps or select_warps(block_pages), "num_stages": num_stages}
        extra = {name: value for name, value in extra.items() if value is not None}
    _page_step_kernel[(bsz * hkv, n_splits)](
        q, k, v, lengths_i, bounds, pages, o_part, l_part, counters, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        hkv, n, kk, n_splits, split_len, page_size, scale * LOG2E,
        GROUP=group, GP=gp, HEAD_DIM=d, BLOCK_N=block_n, BLOCK_PAGES=block_pages, PROBES=probes,
        CHUNK=min(16, triton.next_power_of_2(n_splits)), IN_PAGE=in_page, FORCE_LAST=force_last,
        **extra,
    )  # fmt: skip
    return PageStep(out, pages, bounds)


def page_step_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    n_select: int,
    *,
    page_size: int,
    scale: float,
    pool: str = "max",
    force_last: bool = False,
) -> PageStep:
    """The three references in a row: ``page_bounds_reference`` -> ``page_select_reference``
    -> ``page_decode_reference`` over every head's min(n_select, N) pages."""
    bounds = page_bounds_reference(q, kmin, kmax, pool=pool)
    pages = page_select_reference(bounds, n_select, force_last=force_last)
    counts = torch.full(lengths.shape, pages.shape[-1], device=lengths.device)
    out = page_decode_reference(q, k, v, lengths, pages, counts, page_size=page_size, scale=scale)
    return PageStep(out, pages, bounds)


def kernel_applies(q: torch.Tensor, kmin: torch.Tensor) -> bool:
    """The fused path needs CUDA, a power-of-two head dimension of at least 16 and at most
    ``page_select.MAX_PAGES`` pages per head."""
    d = q.shape[-1]
    return (
        q.is_cuda
        and triton is not None
        and d >= 16
        and d & (d - 1) == 0
        and kmin.shape[2] <= MAX_PAGES
    )


def page_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    n_select: int,
    *,
    page_size: int,
    scale: float,
    pool: str = "max",
    force_last: bool = False,
    counters: torch.Tensor | None = None,
) -> PageStep:
    """Dispatch: the two-launch Triton step on CUDA; elsewhere (or past ``MAX_PAGES`` pages)
    the three dispatchers in a row, which on the CPU are the references."""
    if kernel_applies(q, kmin):
        with torch.cuda.device(q.device):  # Triton launches on the current device
            return page_step_triton(
                q, k, v, lengths, kmin, kmax, n_select,
                page_size=page_size, scale=scale, pool=pool, force_last=force_last,
                counters=counters,
            )  # fmt: skip
    bounds = page_bounds(q, kmin, kmax, pool=pool)
    pages = page_select(bounds, n_select, force_last=force_last)
    counts = torch.full(lengths.shape, pages.shape[-1], device=lengths.device)
    out = page_decode(
        q, k, v, lengths, pages, counts, page_size=page_size, scale=scale,
        max_pages=pages.shape[-1],
    )  # fmt: skip
    return PageStep(out, pages, bounds)
