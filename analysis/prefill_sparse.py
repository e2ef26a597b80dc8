"""Prefill-side sparse attention: block masks over the prompt's causal attention, and what
they keep of it.

Decode-side methods (``analysis.sparse_recall``) pick rows for one query; these pick, for the
whole prefill, which (query, key) entries of the causal attention are computed at all. Inputs
are one layer's post-RoPE queries [Hq, T, D] and keys/values [Hkv, T, D] (GQA: query head h
reads KV head h // (Hq / Hkv)); nothing here runs a model (``probes.queries.capture_qkv``
gathers them). Per query head:

- **XAttention** (Xu et al. 2025, "XAttention: Block Sparse Attention with Antidiagonal
  Scoring"): the causal attention is cut into ``block`` x ``block`` tiles; a tile's score is
  the sum of its antidiagonal entries taken with a ``stride`` (entries (i, j) with
  (i + j) mod stride == stride - 1: the lower-left-to-upper-right lines of each
  stride x stride sub-tile). Per query block the scores are normalised to sum to 1 and the
  blocks are taken in descending order until their cumulative score reaches ``threshold``
  (the block that crosses it included). ``scoring="probs"`` (default) sums the antidiagonal
  entries of the exact softmax probabilities of each row (the bench has them): it measures
  the antidiagonal proxy's selection, not its cost. ``scoring="strided"`` is the paper's
  cheap estimate: queries and keys regrouped by the stride so one dot product sums a tile's
  antidiagonal logits, the reduced matrix (divided by the stride) softmaxed per reduced row
  under a causal mask and summed per block. ``keep_sink`` always keeps the first key block
  (attention sinks), as block-sparse implementations commonly do. Departures: the diagonal
  block is always kept (every query sees itself), and ``threshold >= 1`` keeps every causal
  block.
- **Vertical-slash** (MInference, Jiang et al. 2024): the last ``last_q`` queries' exact
  attention is summed per key column (vertical score) and per diagonal offset i - j (slash
  score); the top ``vertical`` columns and top ``slash`` offsets are kept for every query of
  the head (a token-level mask, not a block mask). Departures: offset 0 (each query's own
  key) is always among the slashes and column 0 (the sink) among the verticals, where
  MInference's kernel forces its first columns and last diagonals by a fixed count.
- **PSA** (Li et al. 2025, "PSA: Pyramid Sparse Attention"): instead of keep/drop, each
  (query block, key block) gets a pooling level: level l mean-pools the block's keys and
  values in groups of 2**l tokens, so the block costs 1 / 2**l of a full one; blocks past the
  last level are dropped. What is followed: the block importance is XAttention's normalised
  antidiagonal score (above); blocks are ranked per query block and the cumulative score
  cuts at ``thresholds`` (t_0 <= t_1 <= ...) assign level 0 (full resolution) to the blocks
  up to t_0, level 1 up to t_1, and so on, the rest dropped; the diagonal block is always
  level 0 with the causal mask inside it (``keep_sink``: the first key block too). A pooled
  key of m tokens carries a logit bias log(m), so it stands for the m keys it replaces (our
  choice; the abstract does not say how pooled logits are weighted). PSA's own importance
  estimator and kernel tiling are not reproduced.

Measured per (method, layer, head) by ``layer_table``: ``density``, the share of the causal
entries computed (a pooled level-l block counts 1 / 2**l of its entries); ``recall``, the mean
over queries of the true attention mass inside the kept entries (for PSA: inside the blocks
kept at any level), and its minimum over queries; ``output_error``, ||O_s - O||_F / ||O||_F of
the head's attention output with the mask (for PSA: the pooled-level approximation) against
full causal attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import polars as pl
import torch

from probes.errors import KvlensError

DROPPED = -1


@dataclass(frozen=True)
class XAttention:
    block: int = 64
    stride: int = 8
    threshold: float = 0.9
    scoring: str = "probs"
    keep_sink: bool = False
    name: str = field(default="xattention", init=False)

    def label(self) -> str:
        tail = "" if self.scoring == "probs" else f",scoring={self.scoring}"
        tail += ",keep_sink=1" if self.keep_sink else ""
        return (
            f"xattention:block={self.block},stride={self.stride},threshold={self.threshold}{tail}"
        )


@dataclass(frozen=True)
class VerticalSlash:
    last_q: int = 64
    vertical: int = 64
    slash: int = 64
    name: str = field(default="vertical_slash", init=False)

    def label(self) -> str:
        return f"vertical_slash:last_q={self.last_q},vertical={self.vertical},slash={self.slash}"


@dataclass(frozen=True)
class PSA:
    block: int = 64
    stride: int = 8
    thresholds: tuple[float, ...] = (0.7, 0.8, 0.9, 0.95)
    scoring: str = "probs"
    keep_sink: bool = False
    name: str = field(default="psa", init=False)

    def label(self) -> str:
        cuts = "/".join(str(t) for t in self.thresholds)
        tail = "" if self.scoring == "probs" else f",scoring={self.scoring}"
        tail += ",keep_sink=1" if self.keep_sink else ""
        return f"psa:block={self.block},stride={self.stride},thresholds={cuts}{tail}"


PrefillMethod = XAttention | VerticalSlash | PSA
METHODS = {"xattention": XAttention, "vertical_slash": VerticalSlash, "psa": PSA}


def parse_spec(spec: str) -> PrefillMethod:
    """``xattention:block=64,stride=8,threshold=0.9``, ``vertical_slash:last_q=64,vertical=64,
    slash=64`` or ``psa:block=64,thresholds=0.7/0.8/0.9/0.95``; omitted parameters default."""
    name, _, rest = spec.strip().partition(":")
    if name not in METHODS:
        raise KvlensError(f"prefill method must be one of {', '.join(METHODS)}, not '{name}'")
    cls = METHODS[name]
    fields = {f for f in cls.__dataclass_fields__ if f != "name"}
    kwargs: dict = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in fields:
            raise KvlensError(
                f"{name}: '{part}' is not one of its parameters ({', '.join(sorted(fields))}=...)"
            )
        try:
            if key == "thresholds":
                kwargs[key] = tuple(float(x) for x in value.split("/"))
            elif key == "threshold":
                kwargs[key] = float(value)
            elif key == "keep_sink":
                kwargs[key] = bool(int(value))
            elif key == "scoring":
                if value not in ("probs", "strided"):
                    raise KvlensError(f"{name}: scoring must be probs or strided, not {value!r}")
                kwargs[key] = value
            else:
                kwargs[key] = int(value)
        except ValueError:
            raise KvlensError(f"{name}: {key}={value!r} is not a number") from None
    method = cls(**kwargs)
    for key in ("block", "stride", "last_q", "vertical", "slash"):
        if getattr(method, key, 1) < 1:
            raise KvlensError(f"{name}: {key} must be >= 1")
    return method


def _expand_kv(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    hq, hkv = q.shape[0], kv.shape[0]
    if hq % hkv:
        raise KvlensError(f"{hq} query heads do not group over {hkv} KV heads")
    return kv.repeat_interleave(hq // hkv, dim=0)


def causal_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact causal softmax [Hq, T, T] of queries [Hq, T, D] over keys [Hkv or Hq, T, D]."""
    k = _expand_kv(q, k)
    t = q.shape[1]
    logits = q @ k.transpose(-1, -2) * scale
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


def antidiagonal_scores(probs: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Per head and (query block, key block) [H, nB, nB]: the sum of the entries (i, j) of
    ``probs`` [H, T, T] with (i + j) % stride == stride - 1 inside the tile."""
    if block % stride:
        raise KvlensError(f"block ({block}) must be a multiple of stride ({stride})")
    h, t, _ = probs.shape
    nb = math.ceil(t / block)
    idx = torch.arange(t, device=probs.device)
    anti = ((idx[:, None] + idx[None, :]) % stride) == stride - 1
    padded = probs.new_zeros(h, nb * block, nb * block)
    padded[:, :t, :t] = probs * anti
    return padded.reshape(h, nb, block, nb, block).sum(dim=(2, 4))


def _cumulative_levels(
    scores: torch.Tensor, cuts: tuple[float, ...], keep_sink: bool = False
) -> torch.Tensor:
    """Levels [H, nB, nB] from block scores: per query block, blocks ranked by normalised score;
    a block whose preceding cumulative score is below cuts[l] (and not below cuts[l-1]) gets
    level l; past the last cut DROPPED. Non-causal blocks are DROPPED, the diagonal level 0."""
    h, nb, _ = scores.shape
    causal = torch.ones(nb, nb, dtype=torch.bool, device=scores.device).tril()
    s = scores.masked_fill(~causal, 0.0)
    norm = s / s.sum(-1, keepdim=True).clamp(min=1e-30)
    order = norm.argsort(dim=-1, descending=True)
    ranked = norm.gather(-1, order)
    before = ranked.cumsum(-1) - ranked  # cumulative score of the blocks ranked above
    level_ranked = torch.full_like(order, DROPPED)
    for lvl in reversed(range(len(cuts))):
        keep = before < cuts[lvl] if cuts[lvl] < 1.0 else torch.ones_like(before, dtype=torch.bool)
        level_ranked = torch.where(keep, torch.full_like(order, lvl), level_ranked)
    levels = torch.full_like(order, DROPPED).scatter(-1, order, level_ranked)
    levels = levels.masked_fill(~causal, DROPPED)
    diag = torch.arange(nb, device=scores.device)
    levels[:, diag, diag] = 0
    if keep_sink:
        levels[:, :, 0] = 0
    return levels


def strided_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, block: int, stride: int
) -> torch.Tensor:
    """XAttention's cheap estimate [H, nB, nB] (the paper's kernel): queries and keys regrouped
    by ``stride`` so that one dot product of a reduced row a and column b is the sum of the
    logits on the antidiagonal of the stride x stride tile (rows stride*a + stride-1-r, keys
    stride*b + r); the reduced logits, divided by ``stride``, are softmaxed per reduced row under
    a causal mask (b <= a) and summed per block."""
    if block % stride:
        raise KvlensError(f"block ({block}) must be a multiple of stride ({stride})")
    k = _expand_kv(q, k)
    h, t, d = q.shape
    nb = math.ceil(t / block)
    n = nb * block
    qp = torch.cat([q, q.new_zeros(h, n - t, d)], dim=1).reshape(h, n // stride, stride, d)
    kp = torch.cat([k, k.new_zeros(h, n - t, d)], dim=1).reshape(h, n // stride, stride, d)
    rq = qp.flip(2).reshape(h, n // stride, stride * d)  # row r of a tile: query stride-1-r
    rk = kp.reshape(h, n // stride, stride * d)
    logits = rq @ rk.transpose(-1, -2) * scale / stride
    m = n // stride
    real = torch.arange(m, device=q.device) * stride < t  # reduced groups holding a token
    causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril() & real[None, :]
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1) * real[None, :, None]
    r = block // stride
    return p.reshape(h, nb, r, nb, r).sum(dim=(2, 4))


def _block_scores(probs, cfg, q=None, k=None, scale=None) -> torch.Tensor:
    if cfg.scoring == "probs":
        return antidiagonal_scores(probs, cfg.block, cfg.stride)
    if cfg.scoring == "strided":
        if q is None or k is None or scale is None:
            raise KvlensError("strided scoring needs the queries, keys and scale")
        return strided_scores(q, k, scale, cfg.block, cfg.stride)
    raise KvlensError(f"scoring must be 'probs' or 'strided', not {cfg.scoring!r}")


def xattention_blocks(
    probs: torch.Tensor,
    cfg: XAttention,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """XAttention's kept blocks [H, nB, nB] (bool): block scores from the exact causal
    probabilities (``scoring="probs"``) or the paper's strided estimate (``"strided"``, needs
    ``q``, ``k``, ``scale``), then the cumulative threshold per query block."""
    scores = _block_scores(probs, cfg, q, k, scale)
    return _cumulative_levels(scores, (cfg.threshold,), cfg.keep_sink) == 0


def psa_levels(
    probs: torch.Tensor,
    cfg: PSA,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """PSA's pooling level per (query block, key block) [H, nB, nB]; DROPPED where pruned."""
    cuts = tuple(cfg.thresholds)
    if not cuts or any(b < a for a, b in zip(cuts, cuts[1:])):
        raise KvlensError(f"PSA thresholds must be non-empty and non-decreasing, got {cuts}")
    if cfg.block % 2 ** (len(cuts) - 1):
        raise KvlensError(
            f"PSA block ({cfg.block}) must be a multiple of 2**{len(cuts) - 1} for its levels"
        )
    scores = _block_scores(probs, cfg, q, k, scale)
    return _cumulative_levels(scores, cuts, cfg.keep_sink)


def blocks_to_mask(blocks: torch.Tensor, t: int, block: int) -> torch.Tensor:
    """Token mask [H, T, T] of kept blocks [H, nB, nB], causal inside."""
    full = blocks.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)[:, :t, :t]
    return full & torch.ones(t, t, dtype=torch.bool, device=blocks.device).tril()


def vertical_slash_mask(probs: torch.Tensor, cfg: VerticalSlash) -> torch.Tensor:
    """MInference's vertical-slash token mask [H, T, T] from the last queries' attention."""
    h, t, _ = probs.shape
    last = probs[:, max(0, t - cfg.last_q) :]  # [H, n, T]
    n = last.shape[1]
    vert = last.sum(1)  # [H, T] per key column
    qpos = torch.arange(t - n, t, device=probs.device)[:, None]
    offset = qpos - torch.arange(t, device=probs.device)[None, :]  # [n, T]
    valid = offset >= 0
    slash = probs.new_zeros(h, t).scatter_add_(
        1, offset.clamp(min=0).reshape(1, -1).expand(h, -1), (last * valid).reshape(h, -1)
    )  # [H, T] per diagonal offset
    vert[:, 0] = float("inf")
    slash[:, 0] = float("inf")
    cols = vert.topk(min(max(cfg.vertical, 1), t), dim=-1).indices
    offs = slash.topk(min(max(cfg.slash, 1), t), dim=-1).indices
    keep_col = torch.zeros(h, t, dtype=torch.bool, device=probs.device).scatter_(1, cols, True)
    keep_off = torch.zeros(h, t, dtype=torch.bool, device=probs.device).scatter_(1, offs, True)
    i = torch.arange(t, device=probs.device)
    diff = (i[:, None] - i[None, :]).clamp(min=0)  # [T, T]
    causal = torch.ones(t, t, dtype=torch.bool, device=probs.device).tril()
    return (keep_col[:, None, :] | keep_off[:, diff]) & causal


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention output [Hq, T, D] over the kept entries of ``mask`` [Hq, T, T] only."""
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(p) @ v


def pyramid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    levels: torch.Tensor,
    block: int,
    scale: float,
) -> torch.Tensor:
    """Attention output [Hq, T, D] with each (query block, key block) read at its pooling
    level ``levels`` [Hq, nB, nB] (0 full, l: keys/values mean-pooled over 2**l tokens with a
    log(count) logit bias, DROPPED: not read). The diagonal block must be level 0; it is read
    with the causal mask. All levels go through one softmax per query."""
    k, v = _expand_kv(q, k), _expand_kv(q, v)
    h, t, d = q.shape
    nb = levels.shape[-1]
    if nb != math.ceil(t / block):
        raise KvlensError(f"levels cover {nb} blocks, the prompt {math.ceil(t / block)}")
    diag = torch.arange(nb, device=q.device)
    if (levels[:, diag, diag] != 0).any():
        raise KvlensError("the diagonal block must be read at level 0 (full resolution)")
    top = int(levels.max())
    if top > 0 and block % 2**top:
        raise KvlensError(f"block ({block}) must be a multiple of 2**{top}")
    qb = torch.arange(t, device=q.device) // block  # query block of each row
    pad = nb * block - t
    count = torch.cat([q.new_ones(t), q.new_zeros(pad)])
    kp = torch.cat([k, k.new_zeros(h, pad, d)], dim=1)
    vp = torch.cat([v, v.new_zeros(h, pad, d)], dim=1)
    logit_parts, value_parts = [], []
    for lvl in range(top + 1):
        m = 2**lvl
        n_groups = nb * block // m
        c = count.reshape(n_groups, m).sum(-1)  # tokens in each group
        ks = kp.reshape(h, n_groups, m, d).sum(2) / c.clamp(min=1)[None, :, None]
        vs = vp.reshape(h, n_groups, m, d).sum(2) / c.clamp(min=1)[None, :, None]
        logits = q @ ks.transpose(-1, -2) * scale + torch.log(c)[None, None, :]
        kb = torch.arange(n_groups, device=q.device) * m // block  # key block of each group
        read = levels[:, qb][:, :, kb] == lvl  # [H, T, G]
        if lvl == 0:
            pos = torch.arange(n_groups, device=q.device)
            inside = kb[None, :] == qb[:, None]
            read = (read & (kb[None, :] < qb[:, None])[None]) | (
                inside & (pos[None, :] <= torch.arange(t, device=q.device)[:, None])
            )[None]
        read = read & (c > 0)[None, None, :]
        logit_parts.append(logits.masked_fill(~read, float("-inf")))
        value_parts.append(vs)
    p = torch.softmax(torch.cat(logit_parts, dim=-1), dim=-1)
    return p @ torch.cat(value_parts, dim=1)


def _rel_error(approx: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Per head ||approx - full||_F / ||full||_F over [H, T, D]."""
    return (approx - full).flatten(1).norm(dim=-1) / full.flatten(1).norm(dim=-1).clamp(min=1e-30)


def evaluate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    method: PrefillMethod,
    probs: torch.Tensor | None = None,
    full: torch.Tensor | None = None,
    return_output: bool = False,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per query head [Hq]: density, recall (mean over queries), min_recall and output_error
    of ``method`` on one layer. ``probs`` / ``full`` (the exact causal probabilities and
    output) may be passed in to share them across methods; ``return_output`` also returns the
    method's attention output [Hq, T, D]."""
    if probs is None:
        probs = causal_probs(q, k, scale)
    if full is None:
        full = probs @ _expand_kv(q, v)
    t = q.shape[1]
    n_causal = t * (t + 1) / 2
    if isinstance(method, VerticalSlash):
        mask = vertical_slash_mask(probs, method)
        out = masked_attention(q, k, v, mask, scale)
        density = mask.flatten(1).sum(-1).to(probs.dtype) / n_causal
    elif isinstance(method, XAttention):
        blocks = xattention_blocks(probs, method, q, k, scale)
        mask = blocks_to_mask(blocks, t, method.block)
        out = masked_attention(q, k, v, mask, scale)
        density = mask.flatten(1).sum(-1).to(probs.dtype) / n_causal
    elif isinstance(method, PSA):
        levels = psa_levels(probs, method, q, k, scale)
        mask = blocks_to_mask(levels >= 0, t, method.block)
        out = pyramid_attention(q, k, v, levels, method.block, scale)
        weight = torch.where(levels >= 0, 0.5 ** levels.clamp(min=0).to(probs.dtype), 0.0)
        per_entry = weight.repeat_interleave(method.block, 1).repeat_interleave(method.block, 2)
        density = (per_entry[:, :t, :t] * mask).flatten(1).sum(-1) / n_causal
    else:
        raise KvlensError(f"unknown prefill method {method!r}")
    kept = (probs * mask).sum(-1)  # [H, T] mass per query
    got = {
        "density": density,
        "recall": kept.mean(-1),
        "min_recall": kept.min(-1).values,
        "output_error": _rel_error(out, full),
    }
    return (got, out) if return_output else got


SCHEMA = {
    "method": pl.Utf8,
    "config": pl.Utf8,
    "layer": pl.Int16,
    "head": pl.Int16,
    "n_tokens": pl.Int32,
    "density": pl.Float64,
    "recall": pl.Float64,
    "min_recall": pl.Float64,
    "output_error": pl.Float64,
}


def layer_table(
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    scale: float,
    methods: list[PrefillMethod],
    dtype: torch.dtype = torch.float64,
) -> pl.DataFrame:
    """One row per (method config, layer, query head); ``layers`` maps a layer to its
    (queries [Hq, T, D], keys [Hkv, T, D], values [Hkv, T, D]). Columns in ``SCHEMA``."""
    if not methods:
        raise KvlensError("give at least one prefill method")
    cols: dict[str, list] = {name: [] for name in SCHEMA}
    for layer in sorted(layers):
        q, k, v = (x.to(dtype) for x in layers[layer])
        probs = causal_probs(q, k, scale)
        full = probs @ _expand_kv(q, v)
        for method in methods:
            got = evaluate(q, k, v, scale, method, probs=probs, full=full)
            for h in range(q.shape[0]):
                cols["method"].append(method.name)
                cols["config"].append(method.label())
                cols["layer"].append(layer)
                cols["head"].append(h)
                cols["n_tokens"].append(q.shape[1])
                for name in ("density", "recall", "min_recall", "output_error"):
                    cols[name].append(float(got[name][h]))
    return pl.DataFrame(cols, schema=SCHEMA)


def summary(table: pl.DataFrame) -> pl.DataFrame:
    """Per method config: mean density, mean recall, the worst head's min recall, mean and
    worst output error, sorted by method and density."""
    if table.is_empty():
        raise KvlensError("no prefill-sparse rows to summarise")
    return (
        table.group_by("method", "config")
        .agg(
            pl.col("density").mean(),
            pl.col("recall").mean(),
            pl.col("min_recall").min(),
            pl.col("output_error").mean(),
            pl.col("output_error").max().alias("max_output_error"),
        )
        .sort("method", "density")
    )
