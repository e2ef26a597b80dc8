"""Attention recall of a selection, against float64 numpy written out per query head."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from analysis.sparse_recall import (
    SelectedStep,
    hard_heads,
    head_recall,
    recall_curve,
    recall_table,
    step_recall,
)
from probes.errors import KvlensError


def _case(seed: int, g: int = 3, n: int = 50, d: int = 16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(g, d, generator=gen) * 2
    k, v = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    return q, k, v


def _numpy(q, k, v, rows, scale):
    q, k, v = (t.double().numpy() for t in (q, k, v))
    out = []
    for qi in q:
        s = k @ qi * scale
        p = np.exp(s - s.max())
        p /= p.sum()
        sel = np.zeros(len(k), bool)
        sel[rows] = True
        ps = np.exp(s[sel] - s[sel].max())
        ps /= ps.sum()
        o, o_s = p @ v, ps @ v[sel]
        top = np.sort(p)[::-1][: sel.sum()].sum()
        out.append((p[sel].sum(), top, np.linalg.norm(o_s - o) / np.linalg.norm(o)))
    return np.array(out)


def test_recall_oracle_and_error_match_a_written_out_computation():
    for seed in range(4):
        q, k, v = _case(seed)
        rows = torch.randperm(50, generator=torch.Generator().manual_seed(seed))[:12]
        got = step_recall(q, k, v, rows, 0.3)
        want = _numpy(q, k, v, rows.numpy(), 0.3)
        np.testing.assert_allclose(got["recall"].numpy(), want[:, 0], atol=1e-5)
        np.testing.assert_allclose(got["oracle_recall"].numpy(), want[:, 1], atol=1e-5)
        np.testing.assert_allclose(got["output_error"].numpy(), want[:, 2], atol=1e-4)
        assert (got["oracle_recall"] >= got["recall"] - 1e-6).all()


def test_recall_is_one_when_every_row_is_read_and_the_oracle_is_its_own_ceiling():
    q, k, v = _case(7, g=1)
    every = step_recall(q, k, v, torch.arange(50), 0.25)
    assert float(every["recall"][0]) == pytest.approx(1.0, abs=1e-6)
    assert float(every["output_error"][0]) == pytest.approx(0.0, abs=1e-6)
    p = torch.softmax(q @ k.T * 0.25, -1)[0]
    best = step_recall(q, k, v, p.topk(9).indices, 0.25)
    assert float(best["recall"][0]) == pytest.approx(float(best["oracle_recall"][0]), abs=1e-6)


def _steps():
    out = []
    for method, n_read in (("a", 10), ("b", 50)):
        for layer in range(2):
            for step in (1, 2):
                q, k, v = _case(layer * 10 + step, g=2)
                rows = torch.arange(n_read)
                out.append(SelectedStep(method, layer, 1, step, 2, q, k, v, rows, 0.3))
    return out


def test_tables_aggregate_per_method_and_head():
    table = recall_table(_steps())
    assert table.height == 2 * 2 * 2 * 2 and set(table["head"]) == {2, 3}
    curve = recall_curve(table)
    assert curve["method"].to_list() == ["a", "b"]
    assert curve["tokens_read"].to_list() == [10.0, 50.0]
    assert curve.filter(method="b")["recall"][0] == pytest.approx(1.0)
    means = table.filter(method="a").group_by("layer", "head").agg(pl.col("recall").mean())
    heads = head_recall(table, "a")
    for row in means.iter_rows(named=True):
        got = heads.filter(layer=row["layer"], head=row["head"])["recall"][0]
        assert got == pytest.approx(row["recall"])


def test_hard_heads_are_below_the_threshold_under_every_method():
    table = recall_table(_steps())
    assert hard_heads(table, 0.99).height == 0  # method b reads everything: recall 1
    only_a = table.filter(method="a")
    worst = head_recall(only_a)
    hard = hard_heads(
        only_a,
        0.5,
        types=pl.DataFrame({"layer": [0, 1], "head": [2, 2], "type": ["sink", "local"]}),
    )
    assert set(zip(hard["layer"], hard["head"])) == {
        (r["layer"], r["head"]) for r in worst.iter_rows(named=True) if r["recall"] < 0.5
    }
    assert "type" in hard.columns
    with pytest.raises(KvlensError):
        recall_curve(table.clear())
