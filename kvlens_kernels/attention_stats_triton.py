"""Triton kernels for causal attention with exact statistics (FlashAttention-style, GQA).

Two passes, no atomics, deterministic:
  1. ``_forward``: one program per (query block, query head) runs the online softmax over
     the visible key blocks and returns the output and, folded into the same loop, per-row
     log-sum-exp, entropy, sink mass, max probability, mean distance and local mass.
  2. ``_column_sums``: one program per (key block, query head) walks the query blocks that
     can see its keys, recomputes p = exp2(q.k * c - lse2) with the row normaliser from
     pass 1, and sums columns: the attention each key receives (H2O) and that from the
     last ``window`` queries (SnapKV). This costs one more Q.K^T over the causal triangle
     and no V read.
The faster path (``attention_stats_fast``, the default on CUDA) takes the output and LSE
from PyTorch's fused SDPA and runs one pass, ``_stats_from_lse``, for every statistic: it
holds scores transposed (keys as rows) so column sums reduce inside a warp, and adds them to
the output atomically.
Scores are kept in log2 units (scale * log2(e)) so exponentials are exp2. Inputs are one
sequence: q [Hq, Tq, D], k/v [Hkv, Tk, D]; queries are the last Tq positions.
``kvlens_kernels.attention_stats.attention_with_stats`` dispatches here on CUDA.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _forward(
    Q, K, V, OUT, LSE, ENT, SINK, MAXP, DIST, LOCAL,
    stride_qh, stride_qt, stride_kh, stride_kt, stride_vh, stride_vt, stride_oh, stride_ot,
    T_Q, T_K, Q_OFFSET, scale_log2,
    SLIDING: tl.constexpr, GROUP: tl.constexpr, SINKS: tl.constexpr, LOCAL_W: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_Q
    q = tl.load(
        Q + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    qpos = offs_m + Q_OFFSET
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a_i = tl.zeros([BLOCK_M], tl.float32)
    sink_i = tl.zeros([BLOCK_M], tl.float32)
    dist_i = tl.zeros([BLOCK_M], tl.float32)
    loc_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = tl.minimum(T_K, Q_OFFSET + (pid_m + 1) * BLOCK_M)
    if SLIDING > 0:
        lo = tl.maximum(0, (Q_OFFSET + pid_m * BLOCK_M - SLIDING + 1) // BLOCK_N * BLOCK_N)
    else:
        lo = 0
    k_base = K + kvh * stride_kh
    v_base = V + kvh * stride_vh
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T_K
        k = tl.load(
            k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0
        )
        s = tl.dot(q, k, input_precision=DOT) * scale_log2
        valid = (offs_n[None, :] <= qpos[:, None]) & col_ok[None, :]
        if SLIDING > 0:
            valid = valid & (offs_n[None, :] > qpos[:, None] - SLIDING)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        a_i = a_i * alpha + tl.sum(p * tl.where(valid, s, 0.0), 1)
        sink_i = sink_i * alpha + tl.sum(tl.where(offs_n[None, :] < SINKS, p, 0.0), 1)
        dist = (qpos[:, None] - offs_n[None, :]).to(tl.float32)
        dist_i = dist_i * alpha + tl.sum(p * dist, 1)
        loc_i = loc_i * alpha + tl.sum(tl.where(dist < LOCAL_W, p, 0.0), 1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        OUT + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse2 = m_i + tl.log2(l_safe)
    row = h * T_Q + offs_m
    tl.store(LSE + row, lse2, mask=row_ok)
    tl.store(ENT + row, (lse2 - a_i / l_safe) * 0.6931471805599453, mask=row_ok)
    tl.store(SINK + row, sink_i / l_safe, mask=row_ok)
    tl.store(MAXP + row, 1.0 / l_safe, mask=row_ok)
    tl.store(DIST + row, dist_i / l_safe, mask=row_ok)
    tl.store(LOCAL + row, loc_i / l_safe, mask=row_ok)


@triton.jit
def _column_sums(
    Q, K, LSE, RECEIVED, WINDOW,
    stride_qh, stride_qt, stride_kh, stride_kt,
    T_Q, T_K, Q_OFFSET, scale_log2, WINDOW_START,
    SLIDING: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T_K
    k = tl.load(
        K + kvh * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None],
        mask=col_ok[None, :],
        other=0.0,
    )
    received = tl.zeros([BLOCK_N], tl.float32)
    window = tl.zeros([BLOCK_N], tl.float32)
    # the first query that can see this key block (causal), aligned down to a query block
    first_q = tl.maximum(0, pid_n * BLOCK_N - Q_OFFSET) // BLOCK_M * BLOCK_M
    if SLIDING > 0:
        last_q = tl.minimum(T_Q, (pid_n + 1) * BLOCK_N + SLIDING - Q_OFFSET + BLOCK_M)
    else:
        last_q = T_Q
    for start_m in tl.range(first_q, last_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T_Q
        q = tl.load(
            Q + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        lse2 = tl.load(LSE + h * T_Q + offs_m, mask=row_ok, other=float("inf"))
        s = tl.dot(q, k, input_precision=DOT) * scale_log2
        qpos = offs_m + Q_OFFSET
        valid = (offs_n[None, :] <= qpos[:, None]) & row_ok[:, None] & col_ok[None, :]
        if SLIDING > 0:
            valid = valid & (offs_n[None, :] > qpos[:, None] - SLIDING)
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        received += tl.sum(p, 0)
        window += tl.sum(tl.where(offs_m[:, None] >= WINDOW_START, p, 0.0), 0)
    tl.store(RECEIVED + h * T_K + offs_n, received, mask=col_ok)
    tl.store(WINDOW + h * T_K + offs_n, window, mask=col_ok)


def dot_precision(q: torch.Tensor) -> str:
    """The kernels' product precision: float32 inputs are multiplied in full float32 ("ieee"),
    as the reference does (Triton's default would round them to TF32, ~3 decimal digits);
    16-bit inputs take the tensor cores' default ("tf32" is the default, unused for them)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _blocks(head_dim: int, interpret: bool, element: int = 2) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim and element size in bytes: a
    float32 tile takes twice the shared memory of a 16-bit one (d 128, 16-bit tiles in float32
    asked for 256 KiB on an H200, past its 227 KiB)."""
    if interpret:
        return 16, 16, 1, 1
    if element > 2:
        return (
            (64, 64, 4, 2)
            if head_dim <= 64
            else (64, 32, 4, 2)
            if head_dim <= 128
            else (32, 32, 4, 1)
        )
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def attention_stats_triton(
    q,
    k,
    v,
    *,
    scale: float,
    window: int = 32,
    sinks: int = 4,
    local: int = 16,
    sliding_window: int | None = None,
):
    """Output [Hq, Tq, D] and an AttentionStats, computed by the two kernels above."""
    from kvlens_kernels.attention_stats import AttentionStats

    hq, tq, d = q.shape
    hkv, tk, _ = k.shape
    if d & (d - 1) or d > 256:
        raise ValueError(f"head_dim {d} is not a power of two <= 256")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    interpret = q.device.type != "cuda"
    block_m, block_n, warps, stages = _blocks(d, interpret, q.element_size())
    f32 = {"device": q.device, "dtype": torch.float32}
    out = torch.empty_like(q)
    lse, ent, sink, maxp, dist, loc = (torch.empty(hq, tq, **f32) for _ in range(6))
    received = torch.empty(hq, tk, **f32)
    win = torch.empty(hq, tk, **f32)
    scale_log2 = scale * LOG2E
    sliding = int(sliding_window or 0)
    q_offset = tk - tq
    extra = {} if interpret else {"num_warps": warps, "num_stages": stages}
    _forward[(triton.cdiv(tq, block_m), hq)](
        q, k, v, out, lse, ent, sink, maxp, dist, loc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        tq, tk, q_offset, scale_log2,
        SLIDING=sliding, GROUP=hq // hkv, SINKS=sinks, LOCAL_W=local, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, DOT=dot_precision(q), **extra,
    )  # fmt: skip
    _column_sums[(triton.cdiv(tk, block_n), hq)](
        q, k, lse, received, win,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        tq, tk, q_offset, scale_log2, max(0, tq - window),
        SLIDING=sliding, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, DOT=dot_precision(q), **extra,
    )  # fmt: skip
    stats = AttentionStats(
        received=received,
        window=win,
        lse=lse * math.log(2),
        entropy=ent,
        sink_mass=sink,
        max_prob=maxp,
        mean_distance=dist,
        local_mass=loc,
    )
    return out, stats


@triton.jit
def _stats_block(
    q_t, k_base, offs_n, qpos, lse2, scale_log2, T_K, SINKS, LOCAL_W,
    received_ptr, window_ptr, in_window, has_window, a_acc, d_acc, mx_acc, sink_i, loc_i,
    stride_kt, offs_d, MASKED: tl.constexpr, FIRST: tl.constexpr, NEAR: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    """One key block: scores [keys, queries], raw (unscaled) so that exp2's argument is one
    fused multiply-add; per-query sums grow elementwise in [keys, queries] tiles."""
    col_ok = offs_n < T_K
    k = tl.load(
        k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0
    )
    s = tl.dot(k, q_t, input_precision=DOT)
    p = tl.exp2(s * scale_log2 - lse2[None, :])
    if MASKED:
        valid = (
            (offs_n[:, None] <= qpos[None, :]) & col_ok[:, None] & (lse2[None, :] < float("inf"))
        )
        p = tl.where(valid, p, 0.0)
        mx_acc = tl.maximum(mx_acc, tl.where(valid, s, float("-inf")))
        s = tl.where(valid, s, 0.0)
    else:
        mx_acc = tl.maximum(mx_acc, s)
    a_acc += p * s
    d_acc += p * offs_n.to(tl.float32)[:, None]
    if FIRST:
        sink_i += tl.sum(tl.where(offs_n[:, None] < SINKS, p, 0.0), 0)
    if NEAR:
        loc_i += tl.sum(tl.where((qpos[None, :] - offs_n[:, None]) < LOCAL_W, p, 0.0), 0)
    tl.atomic_add(received_ptr + offs_n, tl.sum(p, 1), mask=col_ok, sem="relaxed")
    if has_window:  # the block holds some of the last W query rows (a uniform branch)
        tl.atomic_add(
            window_ptr + offs_n,
            tl.sum(tl.where(in_window[None, :], p, 0.0), 1),
            mask=col_ok,
            sem="relaxed",
        )
    return a_acc, d_acc, mx_acc, sink_i, loc_i


@triton.jit
def _stats_from_lse(
    Q, K, LSE2, RECEIVED, WINDOW, ENT, SINK, MAXP, DIST, LOCAL,
    stride_qh, stride_qt, stride_kh, stride_kt,
    T_Q, T_K, Q_OFFSET, scale_log2, WINDOW_START,
    GROUP: tl.constexpr, SINKS: tl.constexpr, LOCAL_W: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    """Given each row's log2-sum-exp, one query-stationary pass computes the row statistics
    and adds column sums atomically (float atomics: sums agree to rounding, not bit for bit).

    Scores are held transposed, keys as rows: a key's column sum is then a reduction inside
    a thread and its lane quad, while the per-query sums (entropy, distance, maximum) grow
    elementwise in [BLOCK_N, BLOCK_M] tiles and are reduced across warps once, at the end
    (measured 13.6 against 15.6 ms at 32k on an H100, RESULTS.md). Query blocks run
    last-first: the longest causal rows start first, so the tail of the grid is short."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_Q
    q_t = tl.load(
        Q + h * stride_qh + offs_m[None, :] * stride_qt + offs_d[:, None],
        mask=row_ok[None, :],
        other=0.0,
    )
    lse2 = tl.load(LSE2 + h * T_Q + offs_m, mask=row_ok, other=float("inf"))
    qpos = offs_m + Q_OFFSET
    in_window = (offs_m >= WINDOW_START) & row_ok
    has_window = (pid_m + 1) * BLOCK_M > WINDOW_START
    a_acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    d_acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    mx_acc = tl.full([BLOCK_N, BLOCK_M], float("-inf"), tl.float32)
    sink_i = tl.zeros([BLOCK_M], tl.float32)
    loc_i = tl.zeros([BLOCK_M], tl.float32)
    k_base = K + kvh * stride_kh
    rec = RECEIVED + h * T_K
    win = WINDOW + h * T_K
    q_lo = Q_OFFSET + pid_m * BLOCK_M  # first query position of the block
    hi = tl.minimum(T_K, q_lo + BLOCK_M)
    full_end = q_lo // BLOCK_N * BLOCK_N  # blocks before this are fully visible to every row
    near_start = tl.maximum(0, (q_lo - LOCAL_W) // BLOCK_N * BLOCK_N)
    # first block: sinks live here (masked when it is also diagonal)
    offs_n = tl.arange(0, BLOCK_N)
    a_acc, d_acc, mx_acc, sink_i, loc_i = _stats_block(
        q_t, k_base, offs_n, qpos, lse2, scale_log2, T_K, SINKS, LOCAL_W, rec, win, in_window,
        has_window, a_acc, d_acc, mx_acc, sink_i, loc_i, stride_kt, offs_d,
        MASKED=True, FIRST=True, NEAR=True, DOT=DOT,
    )  # fmt: skip
    # fully visible blocks far from the diagonal: no mask, no locality
    for start_n in tl.range(BLOCK_N, tl.minimum(full_end, near_start), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        a_acc, d_acc, mx_acc, sink_i, loc_i = _stats_block(
            q_t, k_base, offs_n, qpos, lse2, scale_log2, T_K, SINKS, LOCAL_W, rec, win,
            in_window, has_window, a_acc, d_acc, mx_acc, sink_i, loc_i, stride_kt, offs_d,
            MASKED=False, FIRST=False, NEAR=False, DOT=DOT,
        )  # fmt: skip
    # blocks near or on the diagonal: masked, with locality
    for start_n in tl.range(tl.maximum(BLOCK_N, tl.minimum(full_end, near_start)), hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        a_acc, d_acc, mx_acc, sink_i, loc_i = _stats_block(
            q_t, k_base, offs_n, qpos, lse2, scale_log2, T_K, SINKS, LOCAL_W, rec, win,
            in_window, has_window, a_acc, d_acc, mx_acc, sink_i, loc_i, stride_kt, offs_d,
            MASKED=True, FIRST=False, NEAR=True, DOT=DOT,
        )  # fmt: skip
    a_i = tl.sum(a_acc, 0) * scale_log2
    dist_i = tl.sum(d_acc, 0)
    mx_i = tl.max(mx_acc, 0) * scale_log2
    row = h * T_Q + offs_m
    ln2 = 0.6931471805599453
    tl.store(ENT + row, (lse2 - a_i) * ln2, mask=row_ok)
    tl.store(SINK + row, sink_i, mask=row_ok)
    tl.store(MAXP + row, tl.exp2(mx_i - lse2), mask=row_ok)
    tl.store(DIST + row, qpos.to(tl.float32) - dist_i, mask=row_ok)
    tl.store(LOCAL + row, loc_i, mask=row_ok)


def _sdpa_with_lse(q, k, v, scale: float):
    """Output and natural-log LSE from PyTorch's cuDNN (else flash) attention, or None."""
    hkv, group = k.shape[0], q.shape[0] // k.shape[0]
    try:
        # KV heads as the batch and the query group as heads: K/V enter as stride-0 expanded
        # views, so nothing is repeated in memory (the same output and LSE as repeating)
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.view(hkv, group, *q.shape[1:]),
            k[:, None].expand(hkv, group, *k.shape[1:]),
            v[:, None].expand(hkv, group, *v.shape[1:]),
            None, True, 0.0, True, False, scale=scale,
        )  # fmt: skip
        return out[0].reshape(q.shape), out[1].reshape(q.shape[0], q.shape[1]).float()
    except (RuntimeError, AttributeError, TypeError):
        pass
    qb = q.unsqueeze(0)
    kb = k.repeat_interleave(group, 0).unsqueeze(0)
    vb = v.repeat_interleave(group, 0).unsqueeze(0)
    try:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            qb, kb, vb, 0.0, True, False, scale=scale
        )
        return out[0][0], out[1][0].float()
    except (RuntimeError, AttributeError, TypeError):
        return None


def attention_stats_fast(
    q,
    k,
    v,
    *,
    scale: float,
    window: int = 32,
    sinks: int = 4,
    local: int = 16,
    sliding_window: int | None = None,
    lse_source: str = "auto",
    blocks: tuple[int, int, int, int] | None = None,
):
    """Output and LSE from SDPA's fused kernel (cuDNN/flash), then one Triton pass for every
    statistic. Falls back to ``attention_stats_triton`` where SDPA cannot give the LSE
    (sliding windows, queries that are not the whole sequence, the interpreter)."""
    from kvlens_kernels.attention_stats import AttentionStats

    hq, tq, d = q.shape
    hkv, tk, _ = k.shape
    kwargs = {
        "scale": scale,
        "window": window,
        "sinks": sinks,
        "local": local,
        "sliding_window": sliding_window,
    }
    got = None
    # the fused kernels are 16-bit kernels: a float32 call (the CPU's dtype, run on a GPU) goes
    # to the Triton passes (cuDNN took float32 inputs on an H200 and returned non-finite
    # outputs, torch 2.11)
    sixteen_bit = q.dtype in (torch.float16, torch.bfloat16)
    if lse_source == "sdpa" or (
        lse_source == "auto" and q.is_cuda and sixteen_bit and not sliding_window and tq == tk
    ):
        got = _sdpa_with_lse(q, k, v, scale)
    if got is None:
        if lse_source == "sdpa":
            raise RuntimeError("SDPA did not return a log-sum-exp here")
        out, st = attention_stats_triton(q, k, v, **kwargs)
        if lse_source == "triton-forward" or sliding_window:
            return out, st  # the two passes computed every statistic (the one pass is causal only)
        lse = st.lse
    else:
        out, lse = got
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    interpret = q.device.type != "cuda"
    # (64, 64, 4 warps, 3 stages) measured fastest of 10 configs at 32k on an H100 (RESULTS.md);
    # larger tiles spill the three [BLOCK_N, BLOCK_M] accumulators out of registers
    block_m, block_n, warps, stages = (16, 16, 1, 1) if interpret else (64, 64, 4, 3)
    if not interpret and d > 128:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    if not interpret and q.element_size() > 2:  # float32 tiles: twice the shared memory
        block_m, block_n, warps, stages = (64, 32, 4, 2) if d <= 128 else (32, 32, 4, 1)
    if blocks is not None and not interpret:
        block_m, block_n, warps, stages = blocks
    f32 = {"device": q.device, "dtype": torch.float32}
    received = torch.zeros(hq, tk, **f32)
    win = torch.zeros(hq, tk, **f32)
    ent, sink, maxp, dist, loc = (torch.empty(hq, tq, **f32) for _ in range(5))
    lse2 = (lse * LOG2E).contiguous()
    extra = {} if interpret else {"num_warps": warps, "num_stages": stages}
    _stats_from_lse[(triton.cdiv(tq, block_m), hq)](
        q, k, lse2, received, win, ent, sink, maxp, dist, loc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        tq, tk, tk - tq, scale * LOG2E, max(0, tq - window),
        GROUP=hq // hkv, SINKS=sinks, LOCAL_W=local, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, DOT=dot_precision(q), **extra,
    )  # fmt: skip
    stats = AttentionStats(
        received=received,
        window=win,
        lse=lse,
        entropy=ent,
        sink_mass=sink,
        max_prob=maxp,
        mean_distance=dist,
        local_mass=loc,
    )
    return out, stats
