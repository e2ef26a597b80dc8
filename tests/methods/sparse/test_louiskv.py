"""LouisKV: a step retrieves only when its query leaves the last retrieval's (crafted queries),
otherwise reads the same rows again; on SmolLM2 a retrieval reads the best whole units (prompt
clusters, output segments) by the written-out estimate plus the newest tokens, a threshold of
-1 retrieves once, a budget past the length is the full cache; bytes by hand; errors one line."""

from __future__ import annotations

import pytest
import torch

from methods.base import DecodeStep, Observation
from methods.memory import SERVING_FLOAT_BYTES as F16
from methods.registry import create
from probes.errors import KvlensError
from tests.conftest import passage
from tests.methods.sparse.helpers import full_run, run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_retrieval_happens_at_semantic_boundaries_only():
    gen = torch.Generator().manual_seed(2)
    hkv, g, d, n = 2, 2, 8, 64
    method = create("louiskv:budget=20,clusters=6,segment=4,local=2,threshold=0.9")
    store = method.new_store(hkv, d, torch.float32, "cpu")
    store.append(torch.randn(hkv, n, d, generator=gen), torch.randn(hkv, n, d), torch.arange(n))
    obs = Observation(
        layer=0, n_layers=1, prefill=True, n_queries=n, n_seen=n, scale=0.3,
        positions=list(store.positions), keys=store.keys, received=None, window=None,
        last=None, window_queries=None,
    )  # fmt: skip
    method.compress(store, obs)
    q1 = torch.randn(hkv * g, d, generator=gen)
    near = q1 + 0.05 * torch.randn(hkv * g, d, generator=gen)  # cosine ~0.99
    far = torch.randn(hkv * g, d, generator=gen)  # cosine ~0
    reads = []
    for i, q in enumerate([q1, near, far]):
        store.append(
            torch.randn(hkv, 1, d, generator=gen), torch.randn(hkv, 1, d), torch.tensor([n + i])
        )
        sel = method.select(store, DecodeStep(0, 1, n + i + 1, 0.3, q, g))
        got = [p.tolist() for p in sel.pages]
        kept = [r.tolist() for r in store.retrieved]
        reads.append((store.retrievals, sel.select_bytes, got, kept))
    assert [r[0] for r in reads] == [1, 1, 2]
    assert reads[0][1] > 0 and reads[1][1] == 0 and reads[2][1] > 0
    # between boundaries: the first step's retrieved rows again, with the newest tokens
    assert reads[1][3] == reads[0][3] and reads[2][3] != reads[0][3]
    for h in range(hkv):
        assert set(reads[0][2][h]) == set(reads[0][3][h]) | {n - 1, n}
        assert set(reads[1][2][h]) == set(reads[0][3][h]) | {n, n + 1}
    torch.testing.assert_close(store.meta["anchor"], far)


@pytest.fixture(scope="module")
def ids(smol):
    return smol[1](passage(3))["input_ids"]


def test_every_retrieval_reads_the_best_whole_units(smol, ids):
    spec = "louiskv:budget=48,clusters=10,segment=2,local=2,threshold=1.0"
    cache, _, _ = run(smol[0], ids, spec, n=6)
    n = len(ids)
    for layer in cache.layers[::8]:
        store, meta = layer.store, layer.store.meta
        assert store.retrievals == len(layer.selections) == 5  # cosine < 1: every step
        keys = store.dense_keys().float()
        for seen, q, rows, _ in layer.selections:
            n_segs = (seen - n) // 2
            tail = n + 2 * n_segs
            always = list(range(min(tail, seen - 2), seen))
            for h in range(3):
                order, offsets = meta["order"][h].long(), meta["offsets"][h].long()
                units = [order[offsets[c] : offsets[c + 1]].tolist() for c in range(10)]
                units += [[n + 2 * j, n + 2 * j + 1] for j in range(n_segs)]
                summaries = torch.cat(
                    [meta["centroids"][h].float(), keys[h, n:tail].reshape(n_segs, 2, 64).mean(1)]
                )
                logits = q[3 * h : 3 * h + 3] @ summaries.T * 0.125  # [3, U]
                sizes = torch.tensor([max(1, len(u)) for u in units], dtype=torch.float32)
                est = (logits.exp() / (logits.exp() * sizes).sum(-1, keepdim=True)).mean(0)
                want, total = set(always), 0
                for u in sorted((u for u in range(len(units)) if units[u]), key=lambda u: -est[u]):
                    if total >= 48 - len(always):
                        break
                    want |= set(units[u])
                    total += len(units[u])
                assert set(rows[h].tolist()) == want


def test_a_threshold_of_minus_one_retrieves_once(smol, ids):
    cache, _, _ = run(smol[0], ids, "louiskv:budget=40,clusters=8,threshold=-1.0,local=4", n=5)
    for layer in cache.layers[::10]:
        assert layer.store.retrievals == 1
        first = set(layer.store.retrieved[0].tolist())  # the first step's retrieval
        for seen, _, rows, _ in layer.selections:
            assert set(rows[0].tolist()) == first | set(range(seen - 4, seen))


def test_budget_past_the_length_is_the_full_cache_and_bytes_are_counted(smol, ids):
    _, want_tokens, want = full_run(smol[0], ids, n=4)
    cache, tokens, logits = run(smol[0], ids, "louiskv:budget=100000,clusters=8", n=4)
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want, atol=2e-4, rtol=1e-4)
    n_prompt, n = len(ids), len(ids) + 3
    per_layer = 3 * n * (2 * 64 * F16 + 4)  # keys, values, int32 positions
    per_layer += 3 * 8 * 64 * F16 + 3 * n_prompt * 4 + 3 * 9 * 4  # centroids, order, offsets
    # no whole segment of 16 yet; the budget covers the cache, so no anchor is kept
    assert cache.nbytes() == 30 * per_layer


@pytest.mark.parametrize(
    "spec",
    ["louiskv:clusters=0", "louiskv:segment=0", "louiskv:threshold=1.5", "louiskv:pool=sum"],
)
def test_bad_parameters_are_one_line(spec):
    with pytest.raises(KvlensError) as err:
        create(spec)
    assert "\n" not in str(err.value) and str(err.value).startswith("louiskv:")
