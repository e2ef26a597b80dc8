"""Causal attention that also returns exact attention statistics, without a T x T matrix.

Per query head it returns the attention output and:
  received[h, k]   column sums of the probabilities: the mass key k receives (H2O's score);
  window[h, k]     the same sum over the last ``window`` queries only (SnapKV's observation);
  lse[h, q]        log-sum-exp of each query row (natural log, scaled scores);
  entropy[h, q]    entropy of each row, in nats;
  sink_mass[h, q]  mass on key positions < ``sinks``;
  max_prob[h, q]   the largest probability in the row;
  mean_distance[h, q]  expected query-key distance under the row's distribution;
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

SLAB_BYTES = 48 * 2**20  # target size of one [heads, block, keys] float32 slab


@dataclass
class AttentionStats:
    """Statistics of one layer's attention for one sequence (tensors on the input's device)."""

    received: torch.Tensor  # [Hq, Tk]
    window: torch.Tensor  # [Hq, Tk]
    lse: torch.Tensor  # [Hq, Tq]
    entropy: torch.Tensor  # [Hq, Tq]
    sink_mass: torch.Tensor  # [Hq, Tq]
    max_prob: torch.Tensor  # [Hq, Tq]
    mean_distance: torch.Tensor  # [Hq, Tq]
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
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
    want_probs: bool = False,
    softcap: float | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Exact causal attention plus statistics, blockwise over queries (PyTorch, any device).

    ``mask``, when given, is a bool [Tq, Tk] (True = may attend) or an additive float mask
    and replaces the causal/sliding rule. Returns (output [Hq, Tq, D] in q's dtype, stats).
    """
    hq, tq, d = q.shape
    hkv, tk, _ = k.shape
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    group = hq // hkv
    q_offset = tk - tq
    dev = q.device
    qf = q.float().view(hkv, group, tq, d)
    kf = k.float()
    vf = v.float()
    out = torch.empty(hq, tq, d, device=dev, dtype=torch.float32)
    received = torch.zeros(hq, tk, device=dev)
    win = torch.zeros(hq, tk, device=dev)
    row_stats = {n: torch.empty(hq, tq, device=dev) for n in ("lse", "ent", "sink", "max", "dist")}
    probs_all = torch.zeros(hq, tq, tk, device=dev) if want_probs else None
    block = max(16, min(tq, SLAB_BYTES // max(1, hq * tk * 4)))
    first_window_row = max(0, tq - window)
    for i0 in range(0, tq, block):
        i1 = min(tq, i0 + block)
        visible = tk if mask is not None else min(tk, q_offset + i1)
        rows = torch.arange(i0, i1, device=dev)
        scores = torch.matmul(qf[:, :, i0:i1], kf[:, None, :visible].transpose(-1, -2))
        scores = scores.view(hq, i1 - i0, visible) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if mask is None:
            allowed = _allowed_block(rows, visible, q_offset, sliding_window)
        elif mask.dtype == torch.bool:
            allowed = mask[i0:i1, :visible]
        else:
            additive = mask[i0:i1, :visible].float()
            scores = scores + additive
            allowed = additive > torch.finfo(torch.float32).min / 2
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [hq, b]
        p = torch.exp(scores - lse[..., None])
        safe_scores = torch.where(allowed, scores, torch.zeros((), device=dev))
        row_stats["lse"][:, i0:i1] = lse
        row_stats["ent"][:, i0:i1] = lse - (p * safe_scores).sum(-1)
        row_stats["sink"][:, i0:i1] = p[..., :sinks].sum(-1)
        row_stats["max"][:, i0:i1] = p.amax(-1)
        kpos = torch.arange(visible, device=dev, dtype=torch.float32)
        qpos = (rows + q_offset).float()
        row_stats["dist"][:, i0:i1] = qpos[None, :] - p @ kpos
        received[:, :visible] += p.sum(1)
        if i1 > first_window_row:
            lo = max(i0, first_window_row) - i0
            win[:, :visible] += p[:, lo:].sum(1)
        pv = torch.matmul(p.view(hkv, group * (i1 - i0), visible), vf[:, :visible])
        out[:, i0:i1] = pv.view(hq, i1 - i0, d)
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
        probs=probs_all,
    )
    return out.to(q.dtype), stats


def attention_with_stats(q, k, v, **kwargs) -> tuple[torch.Tensor, AttentionStats]:
    """Dispatch: the Triton kernel on CUDA once it exists, the blockwise reference elsewhere."""
    return attention_stats_reference(q, k, v, **kwargs)
