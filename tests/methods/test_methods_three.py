"""EMS, CaM, KV clustering, KVCrush, CompressKV and Task-KV: with a budget above the prompt each
is the full cache on the real SmolLM2, its bytes are the tensors it stores, bad parameters
give one line, and the rule each paper states holds on a crafted case, checked against an
independent computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from methods.base import Observation
from methods.cache import CompressedCache, CompressedLayer, HeadStore
from methods.evaluate import prefill_logits, step_logits
from methods.memory import held_bytes
from methods.registry import create
from probes.compat import cache_arg
from probes.errors import KvlensError
from tests.conftest import passage

N = 200
METHODS = ("ems", "cam", "kvcluster", "kvcrush", "compresskv", "taskkv", "gemfilter")


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    out = tok(passage(4))["input_ids"][:N]
    assert len(out) == N
    return out


def prefill(model, ids, spec):
    cache = CompressedCache(model, create(spec))
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), **cache_arg(model, cache))
    return cache


def observation(keys, values, *, window=None, received=None, last=None, queries=None, scale=1.0):
    """A prefill Observation of one layer whose KV heads hold ``keys``/``values`` [Hkv, L, D]
    at positions 0..L-1, and the store holding them."""
    hkv, n, d = keys.shape
    store = HeadStore(hkv, d, torch.float32, "cpu")
    store.append(keys, values, torch.arange(n))
    obs = Observation(
        layer=0, n_layers=1, prefill=True, n_queries=n, n_seen=n, scale=scale,
        positions=[torch.arange(n)] * hkv, keys=list(keys), received=received, window=window,
        last=last, window_queries=queries,
    )  # fmt: skip
    return store, obs


STEPS = [17, 923]


@pytest.fixture(scope="module")
def full_logits(smol, ids):
    with torch.inference_mode():
        return smol[0](input_ids=torch.tensor([ids + STEPS]), use_cache=False).logits[0, N - 1 :]


@pytest.mark.parametrize("name", METHODS)
def test_budget_above_length_is_the_full_cache(smol, ids, full_logits, name):
    model, _ = smol
    steps = STEPS
    with torch.inference_mode():
        cache = CompressedCache(model, create(f"{name}:budget=10000"))
        got = [prefill_logits(model, ids, cache)]  # the one prefill path (GemFilter's refill)
        got += [step_logits(model, t, cache) for t in steps]
    torch.testing.assert_close(torch.stack(got), full_logits, atol=2e-4, rtol=1e-4)
    # every token kept: 16-bit keys and values plus an int32 position each
    n, d = N + len(steps), model.config.head_dim
    assert cache.nbytes() == 30 * 3 * n * (4 * d + 4)


@pytest.mark.parametrize(
    "spec",
    [
        "ems:budget=48,window=8",
        "cam:budget=48,merge=8",
        "kvcluster:budget=48,recent=8",
        "kvcrush:budget=48,window=8",
        "compresskv:budget=48,window=8",
        "taskkv:budget=40,recent=16",
    ],
)
def test_bytes_are_the_stored_tensors(smol, ids, spec):
    cache = prefill(smol[0], ids, spec)
    stored = 0
    for layer in cache.layers:
        s = layer.store
        stored += held_bytes(*s.keys, *s.values, *s.positions)
        stored += sum(held_bytes(*per_head) for per_head in s.aux.values())
    assert cache.nbytes() == stored
    lengths = [n for layer in cache.layers for n in layer.store.lengths()]
    assert min(lengths) < N  # it compressed


@pytest.mark.parametrize(
    ("spec", "word"),
    [
        ("ems:budget=0", "budget"),
        ("ems:alpha=2", "alpha"),
        ("ems:centres=1", "centres"),
        ("ems:window=128", "window"),
        ("cam:merge=0", "merge"),
        ("cam:sinks=200", "sinks"),
        ("cam:sample=maybe", "sample"),
        ("kvcluster:chunk=1", "chunk"),
        ("kvcluster:budget=30,sinks=4,recent=32", "recent"),
        ("kvcrush:crush=1", "crush"),
        ("kvcrush:anchor=ones", "anchor"),
        ("compresskv:heads_per_layer=0", "heads_per_layer"),
        ("taskkv:heads=1.5", "heads"),
        ("taskkv:budget=20,recent=32", "recent"),
        ("taskkv:scope=all", "scope"),
        ("gemfilter:positions=shifted", "positions"),
        ("gemfilter:kernel=4", "kernel"),
    ],
)
def test_bad_parameters_are_one_line(spec, word):
    with pytest.raises(KvlensError) as err:
        create(spec)
    message = str(err.value)
    assert "\n" not in message and message.startswith(spec.split(":")[0]) and word in message


# -- KV clustering ---------------------------------------------------------------------------


def clustered_layer(spec: str, keys, values, queries):
    """A compressed layer run on a crafted prefill (one attention call of the cache)."""
    layer = CompressedLayer(create(spec), 0, 1)
    layer.lazy_initialization(keys, values)
    seen = []
    compress = layer.method.compress
    layer.method.compress = lambda store, obs: (seen.append(obs), compress(store, obs))[1]
    layer.attend(queries, keys, values, scale=0.5)
    return layer, seen


def test_kvcluster_merging_identical_keys_keeps_output_and_attention_mass():
    g = torch.Generator().manual_seed(0)
    t, d, hq = 24, 8, 2
    keys = torch.randn(t // 2, d, generator=g).repeat_interleave(2, 0)[None, None]  # pairs
    values = torch.randn(1, 1, t, d, generator=g)
    layer, seen = clustered_layer(
        "kvcluster:budget=12,sinks=0,recent=0", keys, values, torch.randn(1, hq, t, d, generator=g)
    )
    store = layer.store
    assert store.lengths() == [12]
    assert store.aux["cluster_size"][0].tolist() == [2.0] * 12
    # a new token's query, through the cache's own attention call
    q, k, v = (torch.randn(1, n, 1, d, generator=g) for n in (hq, 1, 1))
    out = layer.attend(q, k, v, scale=0.5)
    all_k = torch.cat([keys[0, 0], k[0, 0]])
    all_v = torch.cat([values[0, 0], v[0, 0]])
    p = torch.softmax(q[0, :, 0] @ all_k.T * 0.5, dim=-1)  # [Hq, T + 1] over the full tokens
    torch.testing.assert_close(out[0, :, 0], p @ all_v, atol=1e-6, rtol=1e-5)
    # each centroid draws the summed weight of its two members (and the new token its own)
    got = seen[-1].received[0]  # [Hq, 13]
    want = torch.cat([p[:, :-1].view(hq, 12, 2).sum(-1), p[:, -1:]], dim=1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert got.sum(-1).allclose(torch.ones(hq))
    # without the log-size term the centroids draw half of that: the output moves
    plain, _ = clustered_layer("kvcluster:budget=12,sinks=0,recent=0,proportional=false", keys,
                               values, torch.randn(1, hq, t, d, generator=g))  # fmt: skip
    assert not torch.allclose(plain.attend(q, k, v, scale=0.5)[0, :, 0], p @ all_v, atol=1e-3)


def test_kvcluster_merges_the_most_similar_pairs_inside_chunks():
    # chunk of 8: A = even rows, B = odd rows; rows 2 and 3 nearly equal, 4 and 7 nearly equal
    g = torch.Generator().manual_seed(1)
    keys = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    keys[3] = F.normalize(keys[2] + 0.01 * torch.randn(16, generator=g), dim=-1)
    keys[7] = F.normalize(keys[4] + 0.02 * torch.randn(16, generator=g), dim=-1)
    values = torch.randn(8, 16, generator=g)
    layer, _ = clustered_layer(
        "kvcluster:budget=6,sinks=0,recent=0,chunk=8", keys[None, None], values[None, None],
        torch.randn(1, 1, 8, 16, generator=g),
    )  # fmt: skip
    store = layer.store
    assert store.positions[0].tolist() == [0, 1, 3, 5, 6, 7]  # 2 -> 3 and 4 -> 7 merged
    size = dict(zip(store.positions[0].tolist(), store.aux["cluster_size"][0].tolist()))
    assert size[3] == 2 and size[7] == 2 and size[0] == 1
    torch.testing.assert_close(store.values[0][2], (values[2] + values[3]) / 2)
    torch.testing.assert_close(store.keys[0][5], (keys[4] + keys[7]) / 2)


# -- CaM -------------------------------------------------------------------------------------


def cam_case(n=40, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, n, d, generator=g), torch.randn(1, n, d, generator=g)
    attn = 1.0 + torch.arange(n) / n + 0.005 * torch.rand(n, generator=g)  # rising: p_i < 1
    attn = (attn / attn.sum())[None]  # [G = 1, L]
    return keys, values, attn


def test_cam_keeps_the_attention_weighted_value_sum():
    keys, values, attn = cam_case()
    store, obs = observation(keys, values, last=[attn], window=[attn], received=[attn])
    method = create("cam:budget=12,sinks=2,merge=4,sample=false")
    method.compress(store, obs)
    assert store.positions[0].tolist() == [0, 1] + list(range(30, 40))  # StreamingLLM's set
    kept = store.positions[0].long()
    torch.testing.assert_close(store.keys[0], keys[0][kept])  # keys are left alone
    # the value the query read from every token, now read from the kept ones alone
    want = attn[0] @ values[0]
    got = attn[0][kept] @ store.values[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # plain eviction loses it
    assert not torch.allclose(attn[0][kept] @ values[0][kept], want, atol=1e-3)


def test_cam_sampled_merges_average_to_the_expectation():
    keys, values, attn = cam_case(n=24, seed=3)
    store, obs = observation(keys, values, last=[attn], window=[attn], received=[attn])
    create("cam:budget=8,sinks=1,merge=3,sample=false").compress(store, obs)
    expected = store.values[0].clone()
    draws = []
    for seed in range(300):
        s, o = observation(keys, values, last=[attn], window=[attn], received=[attn])
        create(f"cam:budget=8,sinks=1,merge=3,seed={seed}").compress(s, o)
        draws.append(s.values[0].clone())
    draws = torch.stack(draws)
    assert (draws.std(0) > 0).any()  # the masks really are drawn
    torch.testing.assert_close(draws.mean(0), expected, atol=0.2, rtol=0.0)


# -- EMS -------------------------------------------------------------------------------------


def test_ems_keeps_by_global_local_score_and_merges_evicted_into_centres():
    g = torch.Generator().manual_seed(2)
    n, d = 20, 8
    # every key a noisy copy of one of three orthogonal directions
    direction = torch.eye(d)[torch.arange(n) % 3]
    keys = F.normalize(direction + 0.1 * torch.randn(n, d, generator=g), dim=-1)[None]
    values = torch.randn(1, n, d, generator=g)
    received = torch.rand(2, n, generator=g)  # G = 2 query heads
    window = torch.rand(2, n, generator=g)
    store, obs = observation(keys, values, received=[received], window=[window])
    method = create("ems:budget=8,window=2,alpha=0.3,centres=0.25,threshold=0.5")
    # the score, written out: causal-normalised accumulated mass and window mass, each a
    # distribution over the tokens, mixed 0.3 : 0.7
    glob = received.mean(0) / (n - torch.arange(n)).float()
    score = 0.3 * glob / glob.sum() + 0.7 * window.mean(0) / window.mean(0).sum()
    ranked = score.clone()
    ranked[-2:] = float("inf")
    order = ranked.argsort(descending=True).tolist()
    kept, seeds, rest = order[:6], order[6:8], order[8:]
    k0, v0 = keys[0].clone(), values[0].clone()
    joined = {}
    for r in rest:
        best = max(seeds, key=lambda s: float(k0[r] @ k0[s]))
        joined[r] = best if float(k0[r] @ k0[best]) >= 0.5 else None
    assert None in joined.values() and set(joined.values()) - {None}  # both outcomes occur
    method.compress(store, obs)
    assert store.positions[0].tolist() == sorted(kept + seeds)
    for row, pos in enumerate(store.positions[0].tolist()):
        members = [pos] + [r for r in rest if joined[r] == pos]  # just [pos] for exact tokens
        w = score[members]
        torch.testing.assert_close(
            store.values[0][row], (w[:, None] * v0[members]).sum(0) / w.sum(), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            store.keys[0][row], (w[:, None] * k0[members]).sum(0) / w.sum(), atol=1e-5, rtol=1e-5
        )


# -- KVCrush ---------------------------------------------------------------------------------


def test_kvcrush_keeps_evenly_spaced_representatives_by_head_behaviour():
    g = torch.Generator().manual_seed(4)
    n, d, hq = 40, 4, 4
    votes = torch.rand(hq, n, generator=g)
    keys = torch.randn(1, n, d, generator=g)
    store, obs = observation(keys, torch.randn(1, n, d, generator=g), window=[votes])
    method = create("kvcrush:budget=16,window=4,kernel=1,crush=0.25,anchor=alternate")
    kept = set(method.select(store, obs, 0, 16).tolist())
    # importance part: the window plus the best group-mean votes, 12 tokens
    mean = votes.mean(0).clone()
    mean[-4:] = float("inf")
    snap = set(mean.argsort(descending=True)[:12].tolist())
    assert snap <= kept and len(kept) == 16
    # head behaviour: bit h set when token is in head h's top 20; the anchor 0101
    bits = torch.zeros(hq, n, dtype=torch.bool)
    for h in range(hq):
        bits[h, votes[h].argsort(descending=True)[: n // 2]] = True
    anchor = torch.tensor([False, True, False, True])
    evicted = sorted(set(range(n)) - snap)
    dist = {i: int((bits[:, i] != anchor).sum()) for i in evicted}
    ordered = sorted(evicted, key=lambda i: (dist[i], i))
    step = len(ordered) // 4
    assert kept - snap == {ordered[i * step] for i in range(4)}


def test_kvcrush_adds_representatives_to_snapkv_s_set_on_smollm2(smol, ids):
    crush = prefill(smol[0], ids, "kvcrush:budget=64,window=8,crush=0.25")
    snap = prefill(smol[0], ids, "snapkv:budget=48,window=8")
    for layer in (0, 14, 29):
        for a, b in zip(crush.kept_positions(layer), snap.kept_positions(layer)):
            assert len(a) == 64 and set(b.tolist()) <= set(a.tolist())


# -- CompressKV ------------------------------------------------------------------------------


def test_compresskv_lets_the_retrieval_heads_choose_for_every_kv_head():
    g = torch.Generator().manual_seed(5)
    n, d = 30, 4
    window = [torch.rand(3, n, generator=g) for _ in range(3)]  # 3 KV heads x 3 query heads
    window[1][2, 5:10] = 5.0  # query head 5 of the layer (KV head 1) points at tokens 5..9
    keys = torch.randn(3, n, d, generator=g)
    store, obs = observation(keys, torch.randn(3, n, d, generator=g), window=window)
    method = create("compresskv:budget=8,window=3,kernel=1,heads_per_layer=1")
    method.retrieval_heads = {0: [5]}
    method.compress(store, obs)
    for kept in store.positions:  # every KV head keeps head 5's choice, and the window
        assert kept.tolist() == [5, 6, 7, 8, 9, 27, 28, 29]
    method.retrieval_heads = {0: [0]}  # another retrieval head, another set
    store, obs = observation(keys, torch.randn(3, n, d, generator=g), window=window)
    method.compress(store, obs)
    assert store.positions[0].tolist() != [5, 6, 7, 8, 9, 27, 28, 29]


def test_compresskv_picks_each_layer_s_top_scoring_heads(smol):
    from methods.headaware.razor import head_scores

    method = create("compresskv:heads_per_layer=2")
    method.setup(smol[0])
    scores = head_scores(smol[0], "", "echo+induction")
    for layer in (0, 17):
        rows = scores.filter(layer=layer)
        best = rows.sort("score", descending=True)["head"].head(2).to_list()
        assert method.retrieval_heads[layer] == [int(h) for h in best]


# -- Task-KV ---------------------------------------------------------------------------------


def test_taskkv_heterogeneous_head_keeps_all_and_the_others_sinks_recent_middle():
    g = torch.Generator().manual_seed(6)
    n, d = 30, 4
    keys = torch.randn(3, n, d, generator=g)
    values = 0.01 * torch.randn(3, n, d, generator=g)
    values[1] += torch.tensor([10.0, 0, 0, 0])  # KV head 1's output: far from the centre
    queries = [torch.randn(1, 4, d, generator=g) for _ in range(3)]
    window = [torch.rand(1, n, generator=g) for _ in range(3)]
    window[2][0, 10] = 9.0  # the middle token KV head 2's window attends to most
    store, obs = observation(keys, values, window=window, queries=queries)
    method = create("taskkv:budget=8,sinks=2,recent=5,window=4,heads=0.34")
    method.compress(store, obs)
    assert method.last_heterogeneous == [False, True, False]
    assert store.positions[1].numel() == n
    for h in (0, 2):
        kept = store.positions[h].tolist()
        assert len(kept) == 8 and kept[:2] == [0, 1] and kept[-5:] == list(range(25, 30))
        middle = set(kept) - {0, 1, *range(25, 30)}
        want = int(window[h][0, 2:25].argmax()) + 2
        assert middle == {want}
    assert 10 in store.positions[2].tolist()


def test_taskkv_model_scope_ranks_heads_across_layers():
    g = torch.Generator().manual_seed(7)
    n, d = 30, 4
    method = create("taskkv:budget=8,sinks=2,recent=5,window=4,heads=0.17,scope=model")
    stores = []
    for layer in range(2):
        keys = torch.randn(3, n, d, generator=g)
        values = torch.randn(3, n, d, generator=g)
        if layer == 0:
            values = 0.01 * values
            values[1] += torch.tensor([10.0, 0, 0, 0])  # far from its layer's centre
        queries = [torch.randn(1, 4, d, generator=g) for _ in range(3)]
        window = [torch.rand(1, n, generator=g) for _ in range(3)]
        store, obs = observation(keys, values, window=window, queries=queries)
        obs.layer, obs.n_layers = layer, 2
        method.compress(store, obs)
        stores.append(store)
        if layer == 0:  # nothing is decided before the last layer
            assert store.lengths() == [n, n, n]
    # one KV head of six stays whole: the one farthest from its centre, relative to its layer
    assert method.last_heterogeneous == [[False, True, False], [False, False, False]]
    assert stores[0].lengths() == [8, n, 8] and stores[1].lengths() == [8, 8, 8]


# -- GemFilter -------------------------------------------------------------------------------


def last_query_scores(model, tok, ids, layer: int) -> torch.Tensor:
    """Independently of the cache: the last prompt query of ``layer`` (its q projection, hooked,
    rotated by the model's RoPE) against the probe's post-RoPE keys, summed over heads."""
    from probes import capture

    grabbed = []
    proj = model.model.layers[layer].self_attn.q_proj
    handle = proj.register_forward_hook(lambda _m, _i, out: grabbed.append(out.detach()))
    try:
        trace = capture(model, tok, ids, attention="none", kv=True)
    finally:
        handle.remove()
    hq, d = model.config.num_attention_heads, model.config.head_dim
    q = grabbed[0][0, -1].view(hq, d).float()
    cos, sin = model.model.rotary_emb(q, torch.tensor([[len(ids) - 1]]))
    a, b = q.chunk(2, dim=-1)
    q = q * cos[0] + torch.cat([-b, a], dim=-1) * sin[0]
    keys = trace.key(layer).float()  # [Hkv, T, D]
    group = hq // keys.shape[0]
    return sum(q[h] @ keys[h // group].T for h in range(hq))


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_gemfilter_refills_the_tokens_an_early_layer_picks(smol, ids, positions):
    model, tok = smol
    spec = f"gemfilter:budget=64,layer=5,kernel=5,positions={positions}"
    cache = CompressedCache(model, create(spec))
    with torch.inference_mode():
        first = prefill_logits(model, ids, cache)
        second = step_logits(model, 4051, cache)
    score = F.avg_pool1d(last_query_scores(model, tok, ids, 5)[None, None], 5, 1, 2)[0, 0]
    chosen = torch.topk(score, 64).indices.sort().values
    # the cache is a prefill of the chosen tokens alone (at their new or their old positions);
    # the reference runs through a plain cache: without one, transformers reads positions
    # with gaps as packed sequences and masks across them
    picked = [ids[i] for i in chosen.tolist()]
    where = torch.arange(64) if positions == "renumber" else chosen
    after = 64 if positions == "renumber" else N
    with torch.inference_mode():
        want = model(
            input_ids=torch.tensor([picked + [4051]]),
            position_ids=torch.cat([where, torch.tensor([after])])[None],
            **cache_arg(model, DynamicCache()),
        ).logits[0, -2:]
    torch.testing.assert_close(torch.stack([first, second]), want, atol=2e-4, rtol=1e-4)
    for layer in (0, 5, 29):
        for kept in cache.kept_positions(layer):
            assert kept.tolist() == where.tolist() + [after]
    d = model.config.head_dim
    assert cache.nbytes() == 30 * 3 * 65 * (4 * d + 4)


@pytest.mark.parametrize("name", METHODS)
def test_the_lab_and_the_cli_list_every_method_with_help_for_each_parameter(name, capsys):
    from app.cli import cmd_methods
    from app.lab_params import HELP
    from methods.registry import available

    cls = available()[name]
    assert cls.paper and cls.summary
    missing = [p for p, _t, _d in cls.parameters() if p not in HELP]
    assert not missing, missing
    cmd_methods(None)
    listing = capsys.readouterr().out
    assert f"\n{name} " in listing and cls.paper in listing
