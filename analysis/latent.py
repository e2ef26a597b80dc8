"""Latent attention readiness: how much of a GQA layer's K/V a joint low-rank latent keeps.

TransMLA (Meng et al. 2025, "TransMLA: Multi-head Latent Attention Is All You Need") rewrites
a GQA model as multi-head latent attention (MLA): the keys and values of all KV heads are
compressed *jointly* into one latent per token, its basis taken from a principal-component
analysis of the K/V activations, with up-projections that rebuild every head from it. At
the GQA cache width the rewrite is exact (the paper's theorem: GQA is MLA with the same
cache); below it, a layer is "MLA-ready" when its stacked heads' K/V energy concentrates in
few directions. Per layer, this module stacks every KV head's vectors side by side and
reports the fraction of energy (sum of squared singular values, uncentred as the paper's
PCA of the activations) that the best rank-r latent keeps, for r on a grid:

- ``key`` / ``value``: the keys (or values) alone, one [T, n_kv * head_dim] matrix;
- ``joint``: keys and values side by side, one [T, 2 * n_kv * head_dim] matrix, the keys
  first scaled so that their mean column norm equals the values' (the paper's balanced
  key-value PCA; ``balance=False`` concatenates them as they are). Its rank n_kv * head_dim
  is an MLA latent of half the GQA cache (the bytes of the GQA keys alone).

Per (kind, layer), ``latent_summary`` gives the energy kept at half the kind's width (for
``joint``: rank n_kv * head_dim, half the GQA cache; for ``key``/``value``: a latent of half
their width each, together also half the cache) and the ranks needed for 90% and 99%.

Keys are taken before RoPE where the trace has them (``key_pre_rope``), because MLA caches
its latent without position (RoPE cannot be absorbed into the up-projection; MLA adds it
through a separate decoupled key part); post-RoPE keys (``key``) are used otherwise, and the
``source`` column names which one a row was measured on. ``keys="post_rope"`` measures the
cached keys instead, to show what RoPE costs a latent (on post-RoPE keys the key curve is
xKV's single-layer ``cross_layer.svd_energy``, group size 1).

Departures, on purpose: the paper's RoRoPE/FreqFold steps, which rotate positional
information into one head's worth of key dimensions kept outside the latent (the decoupled
RoPE part), are not modelled: the whole pre-RoPE key goes into the latent, so the figures
are what a latent keeps of the K/V content, not of the positional part.
"""

from __future__ import annotations

import polars as pl
import torch

from probes.errors import KvlensError
from probes.trace import Trace

THRESHOLDS = (0.9, 0.99)
KEY_SOURCES = ("auto", "post_rope")
LATENT_KINDS = ("key", "value", "joint")


def _stacked(x: torch.Tensor) -> torch.Tensor:
    """One layer's heads [Hkv, T, D] side by side: [T, Hkv*D], head h in columns h*D.."""
    n_kv, n_tokens, head_dim = x.shape
    return x.double().transpose(0, 1).reshape(n_tokens, n_kv * head_dim)


def _balanced(keys: torch.Tensor, values: torch.Tensor, balance: bool) -> torch.Tensor:
    """Keys and values side by side, the keys scaled to the values' mean column norm."""
    if balance:
        ratio = keys.norm(dim=0).mean() / values.norm(dim=0).mean().clamp_min(1e-300)
        keys = keys / ratio.clamp_min(1e-300)
    return torch.cat([keys, values], dim=1)


def _matrices(trace: Trace, keys: str, balance: bool, kinds: tuple[str, ...] = LATENT_KINDS):
    """(kind, source, layer, stacked matrix) for each layer and each of ``kinds`` the trace
    holds."""
    if keys not in KEY_SOURCES:
        raise KvlensError(f"keys must be one of {KEY_SOURCES}, got {keys!r}")
    if not kinds or set(kinds) - set(LATENT_KINDS):
        raise KvlensError(f"kinds must be some of {LATENT_KINDS}, got {kinds!r}")
    want_v = "value" in kinds or "joint" in kinds
    found = False
    for layer in trace.layers:
        name = f"layers.{layer}."
        if keys == "auto" and name + "key_pre_rope" in trace.tensors:
            key_source = "key_pre_rope"
        elif name + "key" in trace.tensors:
            key_source = "key"
        else:
            key_source = None
        k = None if key_source is None else _stacked(trace.tensors[name + key_source])
        has_v = want_v and name + "value" in trace.tensors
        v = _stacked(trace.tensors[name + "value"]) if has_v else None
        found = found or k is not None
        if k is not None and "key" in kinds:
            yield "key", key_source, layer, k
        if v is not None and "value" in kinds:
            yield "value", "value", layer, v
        if k is not None and v is not None and "joint" in kinds:
            yield "joint", f"{key_source}+value", layer, _balanced(k, v, balance)
    if not found:
        raise KvlensError("this trace has no key tensors; probe without --no-kv")


def _cumulative(
    trace: Trace, keys: str, balance: bool = True, kinds: tuple[str, ...] = LATENT_KINDS
):
    """(kind, source, layer, cumulative energy fraction at ranks 1..width)."""
    for kind, source, layer, x in _matrices(trace, keys, balance, kinds):
        # squared singular values = eigenvalues of the float64 Gram matrix (columns x
        # columns): the same energies as svdvals(x) ** 2 (to ~1e-13 of the total) in a
        # tenth of the time on long traces; fewer tokens than columns leave zeros
        s2 = torch.linalg.eigvalsh(x.T @ x).flip(0).clamp_min(0)
        yield kind, source, layer, s2.cumsum(0) / s2.sum().clamp_min(1e-300)


def _grid(width: int) -> list[int]:
    """Powers of two below the width, half the width and the full width."""
    ranks = {width // 2, width}
    r = 1
    while r < width:
        ranks.add(r)
        r *= 2
    return sorted(r for r in ranks if r >= 1)


def latent_energy(
    trace: Trace,
    ranks: tuple[int, ...] | None = None,
    keys: str = "auto",
    balance: bool = True,
) -> pl.DataFrame:
    """Fraction of each layer's stacked K, V and joint K+V energy a rank-r latent keeps.

    One row per (kind, layer, rank); ``ranks`` defaults to powers of two, half and all of
    the kind's width; a rank past the width keeps everything (1.0). ``keys="auto"`` takes
    pre-RoPE keys where captured (the paper's latent), ``"post_rope"`` the cached ones;
    ``balance`` scales the keys to the values' norm in the joint latent (the paper's)."""
    rows = []
    for kind, source, layer, cum in _cumulative(trace, keys, balance):
        width = cum.numel()
        for r in ranks or _grid(width):
            if r < 1:
                raise KvlensError(f"latent rank must be at least 1, got {r}")
            rows.append(
                {
                    "kind": kind,
                    "source": source,
                    "layer": layer,
                    "width": width,
                    "rank": r,
                    "energy": float(cum[min(r, width) - 1]),
                }
            )
    return pl.DataFrame(rows)


def latent_summary(
    trace: Trace,
    keys: str = "auto",
    balance: bool = True,
    kinds: tuple[str, ...] = LATENT_KINDS,
) -> pl.DataFrame:
    """Per (kind, layer): energy kept at half the kind's width (a latent of half the GQA
    cache: for ``joint``, rank n_kv * head_dim), and the smallest latent rank keeping 90% and
    99% of the energy (``keys`` and ``balance`` as in ``latent_energy``; ``kinds`` picks some
    of key, value and joint)."""
    rows = []
    for kind, source, layer, cum in _cumulative(trace, keys, balance, kinds):
        width = cum.numel()
        row = {
            "kind": kind,
            "source": source,
            "layer": layer,
            "width": width,
            "half_rank": width // 2,
            "energy_at_half": float(cum[max(width // 2, 1) - 1]),
        }
        for q in THRESHOLDS:
            row[f"rank_{round(q * 100)}"] = min(int((cum < q).sum()) + 1, width)
        rows.append(row)
    return pl.DataFrame(rows)
