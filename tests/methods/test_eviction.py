"""Eviction methods on the real SmolLM2: exactness with a large budget, and each method's
kept set checked against its rule, computed independently from a probe of the same prompt."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods.cache import CompressedCache
from methods.registry import available, create
from probes import capture
from probes.compat import cache_arg
from tests.conftest import passage

N = 200


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    out = tok(passage(4))["input_ids"][:N]
    assert len(out) == N
    return out


@pytest.fixture(scope="module")
def probe(smol, ids):
    model, tok = smol
    return capture(model, tok, ids, attention="stats", window=8, kv=False)


def prefill(model, ids, spec):
    cache = CompressedCache(model, create(spec))
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), **cache_arg(model, cache)).logits[0, -1]
    return cache, logits


def group_scores(probe, layer, column, kv_head):
    df = probe.key_stats.filter(layer=layer, kv_head=kv_head)
    t = torch.tensor(df.sort("head", "position")[column].to_numpy()).view(-1, N)
    return t.mean(0)


@pytest.mark.parametrize(
    "name", sorted(n for n, c in available().items() if c.family == "eviction")
)
def test_budget_above_length_equals_full_cache(smol, ids, name):
    model, _ = smol
    steps = [
        int(t) for t in torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(1))
    ]
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([ids + steps]), use_cache=False).logits[0]
        cache, first = prefill(model, ids, f"{name}:budget={N + 50}")
        got = [first]
        for t in steps:
            step = model(input_ids=torch.tensor([[t]]), **cache_arg(model, cache))
            got.append(step.logits[0, -1])
    want = full[N - 1 : N + len(steps)]
    torch.testing.assert_close(torch.stack(got), want, atol=2e-4, rtol=1e-4)
    assert all(len(p) == N + len(steps) for p in cache.kept_positions(0))


def test_streamingllm_keeps_sinks_and_recent(smol, ids):
    cache, _ = prefill(smol[0], ids, "streamingllm:budget=40,sinks=4")
    expected = list(range(4)) + list(range(N - 36, N))
    for layer in (0, 15, 29):
        for kept in cache.kept_positions(layer):
            assert kept.tolist() == expected


def test_recent_keeps_the_last_tokens(smol, ids):
    cache, _ = prefill(smol[0], ids, "recent:budget=30")
    assert all(k.tolist() == list(range(N - 30, N)) for k in cache.kept_positions(3))


def test_snapkv_keeps_window_plus_top_pooled_window_votes(smol, ids, probe):
    budget, window, kernel = 48, 8, 7
    cache, _ = prefill(smol[0], ids, f"snapkv:budget={budget},window={window},kernel={kernel}")
    for layer in (2, 20):
        for h, kept in enumerate(cache.kept_positions(layer)):
            votes = group_scores(probe, layer, "window", h)
            pooled = F.max_pool1d(votes[None, None], kernel, 1, kernel // 2)[0, 0]
            pooled[N - window :] = float("inf")
            want = set(torch.topk(pooled, budget).indices.tolist())
            got = set(kept.tolist())
            assert len(got) == budget
            # allow ties at the boundary: every kept token must score >= the weakest wanted
            assert len(got ^ want) <= 2, (layer, h, sorted(got ^ want))
            assert set(range(N - window, N)) <= got


def test_h2o_keeps_recent_window_and_heaviest_hitters(smol, ids, probe):
    budget = 60
    cache, _ = prefill(smol[0], ids, f"h2o:budget={budget},recent=20")
    for layer in (1, 25):
        for h, kept in enumerate(cache.kept_positions(layer)):
            got = set(kept.tolist())
            assert set(range(N - 20, N)) <= got
            acc = group_scores(probe, layer, "received", h)
            acc[N - 20 :] = float("inf")
            want = set(torch.topk(acc, budget).indices.tolist())
            assert len(got ^ want) <= 2


def test_h2o_never_evicts_the_recent_window_while_decoding(smol, ids):
    model, _ = smol
    cache, logits = prefill(model, ids, "h2o:budget=40,recent=10")
    with torch.inference_mode():
        for step in range(5):
            tok = int(logits.argmax())
            logits = model(input_ids=torch.tensor([[tok]]), **cache_arg(model, cache)).logits[0, -1]
            seen = N + step + 1
            for kept in cache.kept_positions(7):
                assert len(kept) == 40
                assert set(range(seen - 10, seen)) <= set(kept.tolist())


def test_pyramidkv_budgets_fall_with_depth_and_average_the_budget(smol, ids):
    cache, _ = prefill(smol[0], ids, "pyramidkv:budget=64,window=8")
    sizes = [len(cache.kept_positions(layer)[0]) for layer in range(30)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert abs(sum(sizes) / 30 - 64) <= 1


def test_adakv_shares_the_layer_budget_across_heads(smol, ids):
    cache, _ = prefill(smol[0], ids, "adakv:budget=40,window=8,floor=0.2")
    uneven = 0
    for layer in range(30):
        sizes = [len(k) for k in cache.kept_positions(layer)]
        assert sum(sizes) == 120 and min(sizes) >= 8
        uneven += len(set(sizes)) > 1
    assert uneven > 0  # per-head budgets really differ somewhere


def test_bytes_held_equal_the_stored_tensors(smol, ids):
    cache, _ = prefill(smol[0], ids, "h2o:budget=50")
    kept_tokens = sum(len(k) for layer in range(30) for k in cache.kept_positions(layer))
    # keys + values in float32 (64 channels each), an int32 position and a float32 score
    assert cache.nbytes() == kept_tokens * (2 * 64 * 4 + 4 + 4)
    assert kept_tokens == 30 * 3 * 50


def test_generate_runs_through_a_compressed_cache(smol, ids):
    model, tok = smol
    cache = CompressedCache(model, create("streamingllm:budget=64"))
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), **cache_arg(model, cache), max_new_tokens=6, do_sample=False
        )
    assert out.shape[1] == N + 6
    assert all(len(k) == 64 for k in cache.kept_positions(0))
    assert cache.get_seq_length() == N + 5  # the last token is produced, not yet cached
