"""Each selection rule on a real SmolLM2 run, checked against an independent computation of
the rule from the step's logged queries and the stored keys."""

from __future__ import annotations

import pytest
import torch

from methods.sparse.quest import page_summaries
from tests.conftest import passage
from tests.methods.sparse.helpers import run


@pytest.fixture(scope="module")
def ids(smol):
    return smol[1](passage(3))["input_ids"]


def test_oracle_reads_the_true_top_k_of_each_step(smol, ids):
    model, _ = smol
    cache, _, _ = run(model, ids, "oracle:budget=40", n=4)
    for layer in cache.layers[::7]:
        keys = layer.store.dense_keys()
        for seen, q, rows, _n in layer.selections:
            for h in range(3):
                s = torch.einsum("gd,nd->gn", q[3 * h : 3 * h + 3], keys[h, :seen]) * 0.125
                mass = torch.exp(s - s.logsumexp(-1, keepdim=True)).mean(0)
                best = set(torch.argsort(mass, descending=True)[:40].tolist())
                assert set(rows[h].tolist()) == best


def test_quest_reads_its_top_bound_pages_and_the_current_page(smol, ids):
    model, _ = smol
    cache, _, _ = run(model, ids, "quest:budget=64,page=16", n=4)
    for layer_idx in (0, 2, 17, 29):
        layer = cache.layers[layer_idx]
        keys = layer.store.dense_keys()
        for seen, q, rows, _n in layer.selections:
            n_pages = -(-seen // 16)
            for h in range(3):
                pages = sorted({r // 16 for r in rows[h].tolist()})
                if layer_idx < 2:  # dense layers
                    assert pages == list(range(n_pages))
                    continue
                # the bound per page, written out: the best of q_i * min_i, q_i * max_i
                bounds = []
                for p in range(n_pages - 1):
                    chunk = keys[h, p * 16 : (p + 1) * 16]
                    lo, hi = chunk.amin(0), chunk.amax(0)
                    per_head = [
                        float(torch.maximum(q[g] * lo, q[g] * hi).sum())
                        for g in range(3 * h, 3 * h + 3)
                    ]
                    bounds.append(max(per_head))
                order = sorted(range(n_pages - 1), key=lambda p: -bounds[p])[:3]
                assert pages == sorted(order + [n_pages - 1])


def test_quest_summaries_follow_every_appended_token(smol, ids):
    model, _ = smol
    cache, _, _ = run(model, ids, "quest:budget=32,page=16", n=5)
    for layer in cache.layers[::9]:
        lo, hi = page_summaries(layer.store.dense_keys(), 16)
        assert torch.equal(layer.store.meta["kmin"], lo)
        assert torch.equal(layer.store.meta["kmax"], hi)


def test_random_pages_reads_the_current_page_and_a_seeded_draw(smol, ids):
    model, _ = smol
    a, _, _ = run(model, ids, "random_pages:budget=48,page=8,seed=3", n=4)
    b, _, _ = run(model, ids, "random_pages:budget=48,page=8,seed=3", n=4)
    c, _, _ = run(model, ids, "random_pages:budget=48,page=8,seed=4", n=4)
    differs = False
    for la, lb, lc in zip(a.layers, b.layers, c.layers):
        for (seen, _q, rows, _n), (_, _, rows_b, _), (_, _, rows_c, _) in zip(
            la.selections, lb.selections, lc.selections
        ):
            for h in range(3):
                pages = sorted({r // 8 for r in rows[h].tolist()})
                assert len(pages) == 6 and pages[-1] == (seen - 1) // 8
                assert torch.equal(rows[h], rows_b[h])
                differs |= not torch.equal(rows[h], rows_c[h])
    assert differs
