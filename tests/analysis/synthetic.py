"""Build small synthetic Traces with planted structure for analysis tests."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from probes.models import ModelFacts
from probes.trace import KEY_STATS_SCHEMA, QUERY_STATS_SCHEMA, STEP_STATS_SCHEMA, Trace


def facts(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16) -> ModelFacts:
    return ModelFacts(
        "synthetic", "none", n_layers, n_heads, n_kv_heads, head_dim, 10000.0, 4096, 100, "float32"
    )


def trace(
    n_tokens=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    tensors=None,
    received=None,
    step_rows=None,
    token_ids=None,
    n_prompt=None,
) -> Trace:
    f = facts(n_layers, n_heads, n_kv_heads, head_dim)
    ids = token_ids or list(range(n_tokens))
    key_stats = query_stats = None
    if received is not None:  # [layers, heads, T]
        layer, head, pos = np.meshgrid(
            range(n_layers), range(n_heads), range(n_tokens), indexing="ij"
        )
        seen = n_tokens - pos
        key_stats = pl.DataFrame(
            {
                "layer": layer.ravel(),
                "head": head.ravel(),
                "kv_head": head.ravel() // (n_heads // n_kv_heads),
                "position": pos.ravel(),
                "received": received.ravel(),
                "received_norm": received.ravel() / seen.ravel(),
                "window": received.ravel(),
            }
        ).cast(KEY_STATS_SCHEMA)
        query_stats = pl.DataFrame(
            {
                "layer": layer.ravel(),
                "head": head.ravel(),
                "kv_head": head.ravel() // (n_heads // n_kv_heads),
                "position": pos.ravel(),
                "entropy": np.ones(pos.size),
                "sink_mass": np.full(pos.size, 0.1),
                "max_prob": np.full(pos.size, 0.5),
                "mean_distance": np.full(pos.size, 3.0),
                "local_mass": np.full(pos.size, 0.2),
                "lse": np.zeros(pos.size),
            }
        ).cast(QUERY_STATS_SCHEMA)
    step_stats = None
    if step_rows is not None:
        step_stats = pl.DataFrame(step_rows).cast(STEP_STATS_SCHEMA)
    return Trace(
        model=f,
        prompt="synthetic",
        token_ids=ids,
        tokens=[f"t{i}" for i in ids],
        settings={"sinks": 4, "n_prompt_tokens": n_prompt or len(ids)},
        tensors=tensors or {},
        key_stats=key_stats,
        query_stats=query_stats,
        step_stats=step_stats,
    )


def random_kv(n_layers, n_kv_heads, n_tokens, head_dim, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(n_layers):
        for kind in ("key_pre_rope", "key", "value"):
            out[f"layers.{layer}.{kind}"] = torch.randn(n_kv_heads, n_tokens, head_dim, generator=g)
    return out
