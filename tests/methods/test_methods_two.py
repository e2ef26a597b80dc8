"""Merging, low rank, mixed precision, GEAR, KVQuant and head-aware methods: each keeps the
promise its paper makes, on the real SmolLM2 or on a crafted store."""

from __future__ import annotations

import pytest
import torch

from methods.cache import CompressedCache, HeadStore
from methods.encoded import EncodedStore
from methods.evaluate import compare
from methods.merging.minicache import merge_pair
from methods.registry import available, create
from probes import capture
from probes.compat import cache_arg
from tests.conftest import passage

N = 300


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    out = tok(passage(6))["input_ids"][:N]
    assert len(out) == N
    return out


def prefill(model, ids, spec):
    cache = CompressedCache(model, create(spec))
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), **cache_arg(model, cache)).logits[0, -1]
    return cache, logits


@pytest.fixture(scope="module")
def full_kv(smol, ids):
    model, tok = smol
    return capture(model, tok, ids, attention="none")


def test_svd_at_full_rank_reconstructs_the_cache(smol, ids, full_kv):
    cache, _ = prefill(smol[0], ids, "svd:rank=64")
    for layer in (0, 17):
        keys = cache.layers[layer].store.keys
        for h in range(3):
            torch.testing.assert_close(keys[h].float(), full_kv.key(layer)[h], atol=2e-2, rtol=2e-3)
    r = compare(smol[0], smol[1], ids, "full,svd:rank=64", max_new_tokens=4).results[1]
    assert r.kl_max < 1e-4


def test_svd_bytes_are_its_factors(smol, ids):
    cache, _ = prefill(smol[0], ids, "svd:rank=8")
    # per layer and KV head: float16 coefficients [300, 8] and basis [64, 8] for K and V,
    # plus int32 positions
    assert cache.nbytes() == 30 * 3 * (2 * (N * 8 + 64 * 8) * 2 + N * 4)


def test_xkv_shares_one_coefficient_matrix_per_group(smol, ids):
    cache, _ = prefill(smol[0], ids, "xkv:rank=16,group=2")
    a, b = cache.layers[4].store.encodings[1], cache.layers[5].store.encodings[1]
    assert a.key_coef is b.key_coef and a.owns_coef and not b.owns_coef
    assert cache.layers[4].nbytes() > cache.layers[5].nbytes()


def test_think_keeps_the_top_channels_and_zeroes_the_rest(smol, ids, full_kv):
    cache, _ = prefill(smol[0], ids, "think:prune=0.25")
    enc = cache.layers[3].store.encodings[0]
    assert enc.channels.numel() == 48
    keys = enc.keys()
    pruned = sorted(set(range(64)) - set(enc.channels.tolist()))
    assert keys[:, pruned].abs().max() == 0
    kept = enc.channels.long()
    torch.testing.assert_close(keys[:, kept], full_kv.key(3)[0][:, kept])
    r = compare(smol[0], smol[1], ids, "full,think:prune=0", max_new_tokens=3).results[1]
    assert r.kl_max < 1e-6


def test_merging_two_identical_layers_changes_nothing():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 40, 16), torch.randn(2, 40, 16)
    a, b = EncodedStore(2, 16, torch.float32, "cpu"), EncodedStore(2, 16, torch.float32, "cpu")
    for s in (a, b):
        s.append(keys, values, torch.arange(40))
    merge_pair(a, b, threshold=0.5)
    for s in (a, b):
        for h in range(2):
            assert s.encodings[h].direction_k.shape[0] == 40  # every token merged
            torch.testing.assert_close(s.keys[h], keys[h], atol=3e-3, rtol=3e-3)
            torch.testing.assert_close(s.values[h], values[h], atol=3e-3, rtol=3e-3)
    assert a.nbytes() > b.nbytes()  # the shared directions count once


def test_minicache_keeps_dissimilar_tokens_unmerged(smol, ids):
    cache, _ = prefill(smol[0], ids, "minicache:start=10,threshold=0.9")
    enc = cache.layers[10].store.encodings[0]
    # checked on SmolLM2: adjacent layers' keys are far apart, so at 0.9 almost nothing merges
    assert enc.own_k.shape[0] > 0.9 * N
    merged_all, _ = prefill(smol[0], ids, "minicache:start=10,threshold=-1")
    assert merged_all.layers[10].store.encodings[0].own_k.shape[0] == 0


def test_d2o_merges_evicted_tokens_into_the_nearest_kept_one():
    from methods.base import Observation

    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.0, -1.0]])[None]
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0]]).expand(4, 2)[None].contiguous()
    store = HeadStore(1, 2, torch.float32, "cpu")
    store.append(keys, values, torch.arange(4))
    window = torch.tensor([[1.0, 1.0, 3.0, 1.0]])  # the votes; token 2 is evicted only by budget
    obs = Observation(
        layer=0,
        n_layers=1,
        prefill=True,
        n_queries=4,
        n_seen=4,
        scale=1.0,
        positions=[torch.arange(4)],
        keys=[keys[0]],
        received=[window],
        window=[window],
        last=[window],
        window_queries=[torch.zeros(1, 1, 2)],
    )
    method = create("d2o:budget=2,window=1,kernel=1,threshold=0.5")
    keep = method.select(store, obs, 0, budget=2)
    assert sorted(keep.tolist()) == [
        2,
        3,
    ]  # token 3 is protected (the window), token 2 scores highest
    # token 0 ([1, 0]) merges into token 2 ([0.9, 0.1]) with weights 1 and 3 (cosine 0.99);
    # token 1 ([0, 1]) is nearest to token 2 at cosine 0.11, below the threshold, so it is dropped
    torch.testing.assert_close(store.keys[0][2], (3 * keys[0][2] + 1 * keys[0][0]) / 4)
    torch.testing.assert_close(store.values[0][2], (3 * values[0][2] + values[0][0]) / 4)


def test_razor_keeps_protected_heads_whole_and_compensates_the_others(smol, ids):
    cache, _ = prefill(smol[0], ids, "razor:heads=0.1,sinks=4,recent=32")
    method = cache.method
    assert len(method.protected_kv) > 0
    for layer in range(30):
        store = cache.layers[layer].store
        for h in range(3):
            n = store.positions[h].numel()
            if (layer, h) in method.protected_kv:
                assert n == N
            else:
                assert n == 4 + 32 + 1
                comp = store.aux["compensation"][h] > 0
                assert comp.sum() == 1 and store.aux["compensation"][h][comp].item() == N - 36


def test_duo_streaming_heads_have_no_compensation_token(smol, ids):
    cache, _ = prefill(smol[0], ids, "duo:heads=0.1,sinks=4,recent=32")
    sizes = {cache.layers[i].store.positions[h].numel() for i in range(30) for h in range(3)}
    assert sizes == {N, 36}


def test_gear_keeps_outliers_exactly_and_beats_plain_quantisation(smol, ids, full_kv):
    from methods.quant import dequantize, quantize
    from methods.quantization.gear import gear_encode

    x = full_kv.key(20)[1]
    part = gear_encode(x, bits=2, rank=4, outliers=0.02)
    rebuilt = part.rebuild()
    idx = part.sparse_index.long()
    torch.testing.assert_close(rebuilt.view(-1)[idx], x.reshape(-1)[idx].half().float())
    plain = (dequantize(quantize(x, 2, -1)) - x).norm()
    no_low_rank = (gear_encode(x, bits=2, rank=0, outliers=0.02).rebuild() - x).norm()
    assert (rebuilt - x).norm() < no_low_rank < plain  # each correction lowers the error


def test_kvquant_unrotates_to_the_model_s_pre_rope_keys(smol, ids, full_kv):
    cache, _ = prefill(smol[0], ids, "kvquant:bits=8,outliers=0.01")
    method = cache.method
    post = full_kv.key(6)[2]
    pre = method.rope(post, torch.arange(N), inverse=True)
    torch.testing.assert_close(pre, full_kv.key_pre_rope(6)[2], atol=1e-4, rtol=1e-4)
    rebuilt = cache.layers[6].store.keys[2]
    assert (rebuilt - post).abs().mean() < 0.02 * post.abs().mean()


def test_zipcache_gives_salient_tokens_more_bits(smol, ids):
    cache, _ = prefill(smol[0], ids, "zipcache:salient=0.1,high_bits=8,low_bits=2")
    tiers = cache.layers[12].store.encodings[0].parts
    assert [t[0].bits for t in tiers] == [8, 2]
    assert tiers[0][2].numel() == 30 and tiers[1][2].numel() == N - 30


@pytest.mark.parametrize(
    "name", sorted(n for n, c in available().items() if c.family != "eviction")
)
def test_every_method_lists_and_runs_through_compare(smol, name):
    model, tok = smol
    ids = tok(passage(2))["input_ids"]
    r = compare(model, tok, ids, f"full,{name}", max_new_tokens=3).results[1]
    assert r.family == available()[name].family and r.bytes > 0 and len(r.kl_per_step) == 3


@pytest.mark.parametrize("pool", ["norm", "square"])
def test_think_group_pooling_follows_its_stated_formula(pool):
    """``norm``: mean over the group of per-head query norms times the key norm (kvlens);
    ``square``: kvpress's ThinKPress ranking (mean squared query norm times mean squared key),
    computed here with numpy; on this crafted group the two keep different channels."""
    import types

    import numpy as np

    from methods.lowrank.think import ThinK

    q = np.full((2, 8, 16), 0.1)
    q[0, :, 3], q[1, :, 3] = 10 / np.sqrt(8), 0.0  # one head: norms 10 and 0
    q[:, :, 5] = 6 / np.sqrt(8)  # both heads: norm 6
    keys = np.ones((40, 16))
    obs = types.SimpleNamespace(window_queries=[torch.tensor(q, dtype=torch.float32)])
    method = create(f"think:prune=0.9375,group_pool={pool}")  # keeps 1 of 16 channels
    k = torch.tensor(keys, dtype=torch.float32)
    enc = method.encode_head(obs, 0, k, torch.zeros_like(k), torch.arange(40))
    if pool == "square":
        score = (q**2).mean(1).mean(0) * (keys**2).mean(0)
    else:
        score = np.linalg.norm(q, axis=1).mean(0) * np.linalg.norm(keys, axis=0)
    assert enc.channels.tolist() == [int(np.argmax(score))] == [3 if pool == "square" else 5]
    assert isinstance(method, ThinK)
