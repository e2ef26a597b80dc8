"""Causal attention that also returns exact attention statistics, without a T x T matrix.

Per query head it returns the attention output and:
  received[h, k]   column sums of the probabilities: the mass key k receives (H2O's score);
  window[h, k]     the same sum over the last ``window`` queries only (SnapKV's observation);
  lse[h, q]        log-sum-exp of each query row (natural log, scaled scores);
  entropy[h, q]    entropy of each row, in nats;
  sink_mass[h, q]  mass on key positions < ``sinks``;
  max_prob[h, q]   the largest probability in the row;
  mean_distance[h, q]  expected query-key distance under the row's distribution;
  local_mass[h, q]  mass on the ``local`` nearest positions (distance < ``local``);
and optionally the full probabilities (only when the caller asks and they fit).

The PyTorch reference walks query blocks: each block holds a [heads, block, visible keys]
slab, so extra memory is O(block * T) per head, never T x T. Block sizes adapt to a
memory budget. Inputs are one sequence (no batch): q [Hq, Tq, D], k/v [Hkv, Tk, D] with
query head h reading KV head h // (Hq // Hkv), the order transformers' ``repeat_kv`` uses.
A Triton kernel for CUDA will sit beside it; ``attention_with_stats`` dispatches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLAB_BYTES = 2 * 2**20  # one [heads, block, keys] float32 slab: small enough to stay in cache


@dataclass
class AttentionStats:
    """Statistics of one layer's attention for one sequence (tensors on the input's device)."""

    received: torch.Tensor  # [Hq, Tk]
    window: torch.Tensor  # [Hq, Tk]
    # per query row; None where the caller asked for none (``per_row=False``)
    lse: torch.Tensor | None  # [Hq, Tq]
    entropy: torch.Tensor | None  # [Hq, Tq]
    sink_mass: torch.Tensor | None  # [Hq, Tq]
    max_prob: torch.Tensor | None  # [Hq, Tq]
    mean_distance: torch.Tensor | None  # [Hq, Tq]
    local_mass: torch.Tensor | None  # [Hq, Tq]
    probs: torch.Tensor | None = None  # [Hq, Tq, Tk] when asked for


def _allowed_block(
    rows: torch.Tensor, keys: int, q_offset: int, sliding_window: int | None
) -> torch.Tensor:
    """Bool [rows, keys]: query at absolute position q_offset+row may see key positions <= it."""
    qpos = (rows + q_offset)[:, None]
    kpos = torch.arange(keys, device=rows.device)[None, :]
    allowed = kpos <= qpos
    if sliding_window is not None:
        allowed &= kpos > qpos - sliding_window
    return allowed


def attention_stats_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int = 32,
    sinks: int = 4,
    local: int = 16,
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
    want_probs: bool = False,
    softcap: float | None = None,
    per_row: bool = True,
) -> tuple[torch.Tensor, AttentionStats]:
    """Exact causal attention plus statistics, blockwise over queries (PyTorch, any device).

    ``mask``, when given, is a bool [Tq, Tk] (True = may attend) or an additive float mask
    and replaces the causal/sliding rule. ``per_row=False`` skips the per-row statistics (lse to
    local_mass come back None; output, received and window are the same numbers): a
    compressed cache's prefill reads only the columns. Returns (output [Hq, Tq, D] in q's
    dtype, stats).
    """
    hq, tq, d = q.shape
    hkv, tk, _ = k.shape
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    group = hq // hkv
    q_offset = tk - tq
    dev = q.device
    qf = (q.float() * scale).view(hkv, group, tq, d)  # scale folded into q once
    k_t = k.float().transpose(1, 2)  # [hkv, d, tk]
    vf = v.float()
    out = torch.empty(hq, tq, d, device=dev, dtype=torch.float32)
    received = torch.zeros(hq, tk, device=dev)
    win = torch.zeros(hq, tk, device=dev)
    names = ("lse", "ent", "sink", "max", "dist", "local")
    row_stats = {n: torch.empty(hq, tq, device=dev) if per_row else None for n in names}
    probs_all = torch.zeros(hq, tq, tk, device=dev) if want_probs else None
    block = max(16, min(tq, SLAB_BYTES // max(1, hq * tk * 4)))
    first_window_row = max(0, tq - window)
    neg = torch.tensor(-1e30, device=dev)  # finite "minus infinity": 0 * neg stays 0
    for i0 in range(0, tq, block):
        i1 = min(tq, i0 + block)
        b = i1 - i0
        causal_only = mask is None and sliding_window is None
        visible = tk if mask is not None else min(tk, q_offset + i1)
        rows = torch.arange(i0, i1, device=dev)
        q_blk = qf[:, :, i0:i1].reshape(hkv, group * b, d)
        s = torch.bmm(q_blk, k_t[:, :, :visible]).view(hq, b, visible)
        if softcap is not None:
            s = torch.tanh(s / softcap).mul_(softcap)
        if causal_only:
            # only the diagonal part [q_offset + i0, visible) can be masked
            lo = q_offset + i0
            diag = _allowed_block(rows, visible, q_offset, None)[:, lo:]
            s[..., lo:] = torch.where(diag, s[..., lo:], neg)
        elif mask is None:
            s = torch.where(_allowed_block(rows, visible, q_offset, sliding_window), s, neg)
        elif mask.dtype == torch.bool:
            s = torch.where(mask[i0:i1, :visible], s, neg)
        else:
            s = (s + mask[i0:i1, :visible].float()).clamp_min_(-1e30)
        m = s.amax(-1, keepdim=True)  # [hq, b, 1]
        s.sub_(m)  # s - m <= 0
        p = torch.exp(s)
        z = p.sum(-1, keepdim=True)
        p.div_(z)
        if per_row:
            _row_statistics(row_stats, i0, rows, p, s, m, z, q_offset, sinks, local)
        received[:, :visible] += p.sum(1)
        if i1 > first_window_row:
            lo = max(i0, first_window_row) - i0
            win[:, :visible] += p[:, lo:].sum(1)
        pv = torch.matmul(p.view(hkv, group * b, visible), vf[:, :visible])
        out[:, i0:i1] = pv.view(hq, b, d)
        if probs_all is not None:
            probs_all[:, i0:i1, :visible] = p
    stats = AttentionStats(
        received=received,
        window=win,
        lse=row_stats["lse"],
        entropy=row_stats["ent"],
        sink_mass=row_stats["sink"],
        max_prob=row_stats["max"],
        mean_distance=row_stats["dist"],
        local_mass=row_stats["local"],
        probs=probs_all,
    )
    return out.to(q.dtype), stats


def _row_statistics(row_stats, i0, rows, p, s, m, z, q_offset, sinks, local) -> None:
    """Write the per-row statistics of the block's query rows ``rows`` (i0 the first; ``p``
    its probabilities, ``s`` its scores less the row maximum ``m``, ``z`` the row sums)."""
    dev, visible = p.device, p.shape[-1]
    i1 = i0 + p.shape[1]
    log_z = torch.log(z[..., 0])
    row_stats["lse"][:, i0:i1] = m[..., 0] + log_z
    # entropy = log z - sum_k p_k (s_k - m); masked keys have p = 0 and finite s
    row_stats["ent"][:, i0:i1] = log_z - torch.linalg.vecdot(p, s)
    row_stats["sink"][:, i0:i1] = p[..., :sinks].sum(-1)
    row_stats["max"][:, i0:i1] = 1.0 / z[..., 0]
    kpos = torch.arange(visible, device=dev, dtype=torch.float32)
    qpos = (rows + q_offset).float()
    row_stats["dist"][:, i0:i1] = qpos[None, :] - p @ kpos
    band_lo = max(0, q_offset + i0 - local + 1)  # keys any row of the block holds as local
    band = (qpos[:, None] - kpos[None, band_lo:]) < local
    row_stats["local"][:, i0:i1] = (p[..., band_lo:] * band).sum(-1)


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head that sees every key (a decoding step): q [Hq, 1, D], k/v
    [Hkv, L, D]. Returns (output [Hq, 1, D] in q's dtype, probabilities [Hq, L] float32).

    The output and ``received`` (equal to ``window`` for one query) that
    ``attention_stats_reference`` returns for such a query: the same operations in the same
    order, without the per-row statistics a decoding step does not read (``decode_probs``,
    then the same product with the values)."""
    p = decode_probs(q, k, scale=scale, softcap=softcap)
    hq, hkv, d = q.shape[0], k.shape[0], q.shape[-1]
    out = torch.matmul(p.view(hkv, hq // hkv, -1), v.float()).view(hq, 1, d)
    return out.to(q.dtype), p


def decode_probs(
    q: torch.Tensor, k: torch.Tensor, *, scale: float, softcap: float | None = None
) -> torch.Tensor:
    """Attention [Hq, L] (float32) of one query per head that sees every key, q [Hq, 1, D]
    over k [Hkv, L, D]: ``received`` of ``attention_stats_reference`` for that query.

    Bit for bit when the reference gets every KV head at once (as a probe's recorded row
    does). When it got one KV head per call (a compressed cache's decoding step did), the
    batched product here gives each head's numbers where MKL's batched product rounds as a
    single one: the embedded models' shapes (``split_decode.head_products``;
    tests/kvlens_kernels/test_attention_stats.py checks both), else within float32
    rounding."""
    hq, tq, d = q.shape
    hkv, tk, _ = k.shape
    if tq != 1 or hq % hkv:
        raise ValueError(f"one query per head and whole KV groups, got q {tuple(q.shape)}")
    qf = (q.float() * scale).view(hkv, hq // hkv, d)
    s = torch.bmm(qf, k.float().transpose(1, 2)).view(hq, 1, tk)
    if softcap is not None:
        s = torch.tanh(s / softcap).mul_(softcap)
    s.sub_(s.amax(-1, keepdim=True))
    p = torch.exp(s)
    p.div_(p.sum(-1, keepdim=True))
    return p.view(hq, tk)


def triton_supports(q: torch.Tensor, mask, want_probs: bool, softcap) -> bool:
    """Whether the Triton kernels cover this call (CUDA, causal/sliding, no maps, d in 16..256)."""
    d = q.shape[-1]
    return (
        q.is_cuda
        and mask is None
        and not want_probs
        and softcap is None
        and 16 <= d <= 256
        and d & (d - 1) == 0
    )


def attention_with_stats(
    q, k, v, *, mask=None, want_probs: bool = False, softcap=None, per_row=True, **kwargs
) -> tuple[torch.Tensor, AttentionStats]:
    """Dispatch: the Triton kernels on CUDA where they apply, the blockwise reference elsewhere
    (CPU, explicit masks, full probability maps, softcapping). ``per_row=False`` lets the
    reference skip the per-row statistics (the Triton kernels compute them in passing)."""
    if triton_supports(q, mask, want_probs, softcap):
        try:
            from kvlens_kernels.attention_stats_triton import attention_stats_fast
        except ImportError:  # no Triton installed: the reference still gives exact results
            pass
        else:
            with torch.cuda.device(q.device):  # Triton launches on the current device
                return attention_stats_fast(q, k, v, **kwargs)
    return attention_stats_reference(
        q, k, v, mask=mask, want_probs=want_probs, softcap=softcap, per_row=per_row, **kwargs
    )
