"""Latent attention readiness: how much of a GQA layer's K/V a joint low-rank latent keeps.

TransMLA (Meng et al. 2025) rewrites a GQA model as multi-head latent attention: the keys of
all KV heads are compressed *jointly* into one latent per token (and the values likewise),
with the latent's basis taken from a principal-component analysis of the activations, and
up-projections that rebuild each head from it. At rank n_kv * head_dim the latent holds the
GQA cache exactly; below that, a layer is "MLA-ready" when its stacked heads' K/V energy
concentrates in few directions. Per layer, this module stacks every KV head's vectors side
by side into one [T, n_kv * head_dim] matrix X and reports the fraction of energy (sum of
squared singular values of X, uncentred as the paper's PCA of the activations) that the
best rank-r latent keeps, for r on a grid; and, per layer, the energy kept at half the GQA
cache width and the ranks needed for 90% and 99%.

Keys are taken before RoPE where the trace has them (``key_pre_rope``), because the latent
is formed before rotary position encoding is applied (MLA caches the latent without
position and adds RoPE through a separate decoupled part); post-RoPE keys (``key``) are used
otherwise, and the ``source`` column names which one a row was measured on;
``keys="post_rope"`` measures the cached keys instead, to show what RoPE costs a latent (on
post-RoPE keys the key curve is xKV's single-layer ``cross_layer.svd_energy``, group size 1).

Departures, on purpose: keys and values are measured separately (the paper's last version
balances their norms and runs one PCA over both: compare the two tables' curves, not a joint
one), and the paper's RoRoPE/FreqFold steps, which move positional information into a few
key dimensions before the PCA, are not modelled: on pre-RoPE keys they do not apply.
"""

from __future__ import annotations

import polars as pl
import torch

from probes.errors import KvlensError
from probes.trace import Trace

THRESHOLDS = (0.9, 0.99)
KEY_SOURCES = ("auto", "post_rope")


def _sources(trace: Trace, keys: str) -> list[tuple[str, str, int]]:
    """(kind, tensor source, layer) for each layer and tensor kind the trace holds."""
    if keys not in KEY_SOURCES:
        raise KvlensError(f"keys must be one of {KEY_SOURCES}, got {keys!r}")
    found = []
    for layer in trace.layers:
        if keys == "auto" and f"layers.{layer}.key_pre_rope" in trace.tensors:
            found.append(("key", "key_pre_rope", layer))
        elif f"layers.{layer}.key" in trace.tensors:
            found.append(("key", "key", layer))
        if f"layers.{layer}.value" in trace.tensors:
            found.append(("value", "value", layer))
    if not any(kind == "key" for kind, _, _ in found):
        raise KvlensError("this trace has no key tensors; probe without --no-kv")
    return found


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    """Squared singular values, largest first, of one layer's heads stacked side by side."""
    n_kv, n_tokens, head_dim = x.shape
    stacked = x.double().transpose(0, 1).reshape(n_tokens, n_kv * head_dim)  # [T, Hkv*D]
    s = torch.linalg.svdvals(stacked)
    s2 = torch.zeros(n_kv * head_dim, dtype=torch.float64)
    s2[: s.numel()] = s.square()  # fewer tokens than columns: the rest have no energy
    return s2


def _cumulative(trace: Trace, keys: str):
    for kind, source, layer in _sources(trace, keys):
        s2 = _spectrum(trace.tensors[f"layers.{layer}.{source}"])
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
    trace: Trace, ranks: tuple[int, ...] | None = None, keys: str = "auto"
) -> pl.DataFrame:
    """Fraction of each layer's stacked K (or V) energy a joint rank-r latent keeps.

    One row per (kind, layer, rank); ``ranks`` defaults to powers of two, half and all of
    n_kv * head_dim; a rank past the width keeps everything (1.0). ``keys="auto"`` takes
    pre-RoPE keys where captured (the paper's latent), ``"post_rope"`` the cached ones."""
    rows = []
    for kind, source, layer, cum in _cumulative(trace, keys):
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


def latent_summary(trace: Trace, keys: str = "auto") -> pl.DataFrame:
    """Per (kind, layer): energy kept at half the GQA cache width (n_kv * head_dim / 2), and
    the smallest latent rank keeping 90% and 99% of the energy (``keys`` as in
    ``latent_energy``)."""
    rows = []
    for kind, source, layer, cum in _cumulative(trace, keys):
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
