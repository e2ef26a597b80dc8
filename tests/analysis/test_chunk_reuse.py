"""analysis.chunk_reuse from tensors: deviations against float64 numpy, a planted deviation
found at its layer and position, offsets within each segment, attention total variation."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from analysis.chunk_reuse import (
    _offsets,
    attention_deviation,
    by_offset,
    kv_deviation,
    layer_summary,
)

SEGMENTS = [-1, -1, 0, 0, 0, 1, 1, 1, 1, -2]  # header, chunk 0, chunk 1, question
N_CTX = 9


def _kv(seed: int, layers: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, N_CTX, 4, generator=g) for _ in range(layers)]


def test_offsets_count_within_each_segment():
    assert _offsets(SEGMENTS) == [0, 1, 0, 1, 2, 0, 1, 2, 3, 0]


def test_kv_deviation_matches_numpy_and_finds_the_planted_token():
    fk, fv = _kv(0), _kv(1)
    keys = [k.clone() for k in fk]
    values = [v.clone() for v in fv]
    values[2][:, 6] += 3.0  # layer 2, chunk 1's second token
    keys[1][0, 3, 0] -= 0.5
    df = kv_deviation(fk, fv, keys, values, SEGMENTS)
    assert df.height == 3 * N_CTX
    for layer in range(3):
        rows = df.filter(pl.col("layer") == layer).sort("position")
        dv = np.sqrt(((values[layer].double() - fv[layer].double()).numpy() ** 2).sum((0, 2)))
        nv = np.sqrt((fv[layer].double().numpy() ** 2).sum((0, 2)))
        np.testing.assert_allclose(rows["value_dev"].to_numpy(), dv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rows["value_rel"].to_numpy(), dv / nv, rtol=1e-5, atol=1e-6)
    top = df.sort("value_dev", descending=True).row(0, named=True)
    assert (top["layer"], top["position"], top["segment"], top["offset"]) == (2, 6, 1, 1)
    assert top["value_dev"] == pytest.approx(3.0 * np.sqrt(2 * 4), rel=1e-5)
    key = df.sort("key_dev", descending=True).row(0, named=True)
    assert (key["layer"], key["position"], key["key_dev"]) == (1, 3, pytest.approx(0.5))
    # untouched everywhere else
    assert df.filter(pl.col("layer") == 0)["value_dev"].max() == 0.0


def test_attention_deviation_and_layer_summary():
    g = torch.Generator().manual_seed(2)
    n_all = len(SEGMENTS)
    full = [torch.softmax(torch.randn(3, 1, n_all, generator=g), -1) for _ in range(2)]
    moved = [f.clone() for f in full]
    # layer 1: 0.2 of every head's mass moved from position 2 to position 7
    moved[1][..., 2] -= 0.2
    moved[1][..., 7] += 0.2
    attn = attention_deviation(full, moved, SEGMENTS)
    assert attn.filter(pl.col("layer") == 0)["abs_diff"].max() == 0.0
    kv = kv_deviation(_kv(0, 2), _kv(1, 2), _kv(0, 2), _kv(1, 2), SEGMENTS)
    summary = layer_summary(kv, attn)
    assert summary["layer"].to_list() == [0, 1]
    assert summary["attention_tv"].to_list() == pytest.approx([0.0, 0.2])
    assert summary["value_rel"].to_list() == [0.0, 0.0]
    # a layer missing its rows (not recorded) is skipped
    assert (
        attention_deviation([None, full[1]], [None, moved[1]], SEGMENTS)["layer"].unique()[0] == 1
    )


def test_by_offset_averages_over_chunks_only():
    fk, fv = _kv(0, 1), _kv(1, 1)
    values = [fv[0].clone()]
    values[0][:, 0] += 1.0  # header token: excluded
    values[0][:, 2] += 2.0  # chunk 0, offset 0
    values[0][:, 5] += 4.0  # chunk 1, offset 0
    out = by_offset(kv_deviation(fk, fv, fk, values, SEGMENTS), "value_dev")
    assert out["offset"].to_list() == [0, 1, 2, 3]
    assert out["value_dev"][0] == pytest.approx(3.0 * np.sqrt(8), rel=1e-5)
    assert out["value_dev"][1:].to_list() == [0.0, 0.0, 0.0]
