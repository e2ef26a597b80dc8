"""Eviction methods on the real SmolLM2: exactness with a large budget, and each method's
kept set checked against its rule, computed independently from a probe of the same prompt."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from methods.cache import CompressedCache
from methods.registry import available, create
from probes import capture
from probes.compat import cache_arg
from probes.errors import KvlensError
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


def _has_budget(cls) -> bool:
    return "budget" in {f.name for f in dataclasses.fields(cls)}


def test_every_eviction_method_is_checked_for_exactness():
    # KVzip keeps a ratio of the cache, not a token budget: its ratio=1 exactness is checked
    # in test_kvzip.py
    no_budget = {n for n, c in available().items() if c.family == "eviction" and not _has_budget(c)}
    assert no_budget == {"kvzip"}, no_budget


@pytest.mark.parametrize(
    "name",
    sorted(n for n, c in available().items() if c.family == "eviction" and _has_budget(c)),
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
            votes[N - window :] = 0  # SnapKV pools the votes of the tokens before the window
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
    cache, _ = prefill(smol[0], ids, "pyramidkv:budget=64,window=8,beta=4")
    sizes = [len(cache.kept_positions(layer)[0]) for layer in range(30)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert abs(sum(sizes) / 30 - 64) <= 1


def test_pyramidkv_caps_the_lowest_layer_and_falls_back_when_the_top_is_thin(smol, ids):
    # 2*100 - 100/20 > N - 8: layer 0 is capped at the prompt outside the window, the last
    # layer raised so that the mean stays the budget (the paper's code)
    cache, _ = prefill(smol[0], ids, "pyramidkv:budget=100,window=8")
    sizes = [len(cache.kept_positions(layer)[0]) for layer in range(30)]
    assert sizes[0] == N - 8 and sizes[-1] == 2 * 100 - (N - 8)
    assert abs(sum(sizes) / 30 - 100) <= 1
    # budget/beta below the window: no pyramid, SnapKV's uniform budget
    flat, _ = prefill(smol[0], ids, "pyramidkv:budget=64,window=8")
    assert {len(flat.kept_positions(layer)[0]) for layer in range(30)} == {64}


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
    # keys + values at the 16-bit serving precision (64 channels each, although this CPU
    # computes in float32), an int32 position and the accumulated score, also held in 16 bits
    assert cache.nbytes() == kept_tokens * (2 * 64 * 2 + 4 + 2)
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


SCHEDULED = ("h2o", "tova", "scissorhands", "keyformer")


def decode(model, cache, logits, steps):
    """Greedy steps through ``cache``; yields after each step."""
    with torch.inference_mode():
        for step in range(steps):
            tok = int(logits.argmax())
            logits = model(input_ids=torch.tensor([[tok]]), **cache_arg(model, cache)).logits[0, -1]
            yield step


@pytest.mark.parametrize("name", SCHEDULED)
def test_schedule_prefill_never_changes_the_kept_set_after_prefill(smol, ids, name):
    model, _ = smol
    cache, logits = prefill(model, ids, f"{name}:budget=40,schedule=prefill")
    after_prefill = {layer: cache.kept_positions(layer) for layer in (0, 15, 29)}
    assert all(len(k) == 40 for k in after_prefill[0])
    for step in decode(model, cache, logits, 4):
        for layer, before in after_prefill.items():
            for h, kept in enumerate(cache.kept_positions(layer)):
                new = list(range(N, N + step + 1))
                assert kept.tolist() == before[h].tolist() + new


@pytest.mark.parametrize("name", SCHEDULED)
def test_schedule_continuous_holds_the_cache_at_its_budget(smol, ids, name):
    model, _ = smol
    cache, logits = prefill(model, ids, f"{name}:budget=40")  # continuous is the default
    for step in decode(model, cache, logits, 4):
        for layer in (0, 15, 29):
            kept = cache.kept_positions(layer)
            assert all(len(k) == 40 for k in kept)
            assert all(int(k.max()) == N + step for k in kept)  # the newest token stays
    # a later multi-token chunk (a question) is read under the same budget
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids[:10]]), **cache_arg(model, cache))
    assert all(len(k) == 40 for k in cache.kept_positions(3))


def test_schedule_prefill_reads_a_question_without_evicting(smol, ids):
    model, _ = smol
    cache, _ = prefill(model, ids, "tova:budget=40,schedule=prefill")
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids[:10]]), **cache_arg(model, cache))
    assert all(len(k) == 50 for k in cache.kept_positions(3))


def last_query_attention(model, ids, layer):
    """[Hq, N] attention of the prompt's last query at ``layer``, from eager attentions."""
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("kvlens")
    return out.attentions[layer][0, :, -1].float()


def test_tova_layer_average_keeps_one_set_from_every_query_head(smol, ids):
    model, _ = smol
    budget = 50
    cache, _ = prefill(model, ids, f"tova:budget={budget},average=layer")
    for layer in (4, 22):
        attn = last_query_attention(model, ids, layer)  # [9, N]
        want = set(torch.topk(attn.mean(0), budget).indices.tolist())
        for kept in cache.kept_positions(layer):
            assert len(set(kept.tolist()) ^ want) <= 2
    group, _ = prefill(model, ids, f"tova:budget={budget},average=group")
    attn = last_query_attention(model, ids, 4).view(3, 3, N).mean(1)  # per KV group
    for h, kept in enumerate(group.kept_positions(4)):
        want = set(torch.topk(attn[h], budget).indices.tolist())
        assert len(set(kept.tolist()) ^ want) <= 2
    assert any(
        not torch.equal(a, b)
        for layer in range(30)
        for a, b in zip(group.kept_positions(layer), cache.kept_positions(layer))
    )


def test_h2o_mean_normalisation_divides_by_the_queries_that_saw_each_token(smol, ids, probe):
    budget = 60
    cache, _ = prefill(smol[0], ids, f"h2o:budget={budget},recent=0,normalise=mean")
    summed, _ = prefill(smol[0], ids, f"h2o:budget={budget},recent=0")
    seen_by = torch.arange(N, 0, -1).float()
    differs = 0
    for layer in (1, 25):
        for h, kept in enumerate(cache.kept_positions(layer)):
            acc = group_scores(probe, layer, "received", h)
            want = set(torch.topk(acc / seen_by, budget).indices.tolist())
            assert len(set(kept.tolist()) ^ want) <= 2
            differs += len(set(kept.tolist()) ^ set(summed.kept_positions(layer)[h].tolist()))
    assert differs > 0  # the two normalisations really rank differently


@pytest.mark.parametrize(
    "spec", ["h2o:schedule=sometimes", "tova:average=head", "h2o:normalise=max"]
)
def test_bad_eviction_choices_are_one_line_errors(spec):
    with pytest.raises(KvlensError) as err:
        create(spec)
    assert "\n" not in str(err.value) and spec.split(":")[1].split("=")[0] in str(err.value)
