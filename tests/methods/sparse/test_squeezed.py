"""Squeezed Attention: k-means recovers planted clusters; on SmolLM2 the clusters partition
the context, each centroid is its cluster's mean key, a step reads whole clusters, best by
the written-out estimate, plus every token after the context; all clusters is full."""

from __future__ import annotations

import pytest
import torch

from methods.sparse.squeezed import kmeans
from tests.conftest import passage
from tests.methods.sparse.helpers import full_run, run


def test_kmeans_recovers_planted_clusters():
    torch.manual_seed(0)
    centres = torch.randn(5, 8) * 10
    truth = torch.randint(5, (300,))
    x = centres[truth] + torch.randn(300, 8) * 0.1
    labels = kmeans(x, 5, iters=20, seed=1)
    # the same partition up to renaming: each found cluster is one planted cluster
    for c in labels.unique():
        assert truth[labels == c].unique().numel() == 1
    assert labels.unique().numel() == 5


@pytest.fixture(scope="module")
def case(smol):
    model, tok = smol
    ids = tok(passage(3))["input_ids"]
    return ids, run(model, ids, "squeezed:budget=48,clusters=12", n=4)[0]


def test_clusters_partition_the_context_and_centroids_are_their_means(case):
    ids, cache = case
    n = len(ids)
    for layer in cache.layers[::6]:
        meta, keys = layer.store.meta, layer.store.dense_keys()
        for h in range(3):
            order, offsets = meta["order"][h].long(), meta["offsets"][h].long()
            assert sorted(order.tolist()) == list(range(n)) and int(offsets[-1]) == n
            for c in range(12):
                rows = order[offsets[c] : offsets[c + 1]]
                if rows.numel():
                    mean = keys[h, rows].float().mean(0)
                    torch.testing.assert_close(meta["centroids"][h, c].float(), mean)


def test_a_step_reads_the_best_whole_clusters_and_every_later_token(case):
    ids, cache = case
    n = len(ids)
    for layer in cache.layers[::6]:
        meta = layer.store.meta
        for seen, q, rows, _n in layer.selections:
            for h in range(3):
                order, offsets = meta["order"][h].long(), meta["offsets"][h].long()
                label = torch.empty(n, dtype=torch.long)
                for c in range(12):
                    label[order[offsets[c] : offsets[c + 1]]] = c
                # each context key's logit is its centroid's; softmax over the context keys
                logits = q[3 * h : 3 * h + 3].float() @ meta["centroids"][h].float().T * 0.125
                per_key = torch.softmax(logits[:, label], dim=-1).mean(0)  # [n]
                est = [
                    float(per_key[label == c][0]) if (label == c).any() else -1 for c in range(12)
                ]
                ranked = sorted((c for c in range(12) if est[c] >= 0), key=lambda c: -est[c])
                want, total = [], 0
                for c in ranked:
                    if total >= 48:
                        break
                    want += (label == c).nonzero()[:, 0].tolist()
                    total += int((label == c).sum())
                assert rows[h].tolist() == sorted(want) + list(range(n, seen))


def test_all_clusters_is_the_full_cache(smol):
    model, tok = smol
    ids = tok(passage(2))["input_ids"]
    _, want_tokens, want = full_run(model, ids, n=4)
    _, tokens, logits = run(model, ids, "squeezed:budget=100000,clusters=8,iters=3", n=4)
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want, atol=2e-4, rtol=1e-4)
