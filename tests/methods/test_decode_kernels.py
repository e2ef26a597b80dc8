"""Decode steps through the stores' kernels (sparse decode for eviction stores, quantised
decode for KIVI-layout stores) give the same generation as the statistics path, for every
method that declares it needs no attention statistics while decoding. On the CPU the
dispatchers run the kernels' PyTorch references; on CUDA the Triton kernels (tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from methods.cache import CompressedCache, HeadStore
from methods.evaluate import greedy, prefill_logits
from methods.eviction.base import EvictionMethod
from methods.registry import available, create
from tests.conftest import passage

SPECS = {
    "snapkv": "snapkv:budget=96,window=16",
    "pyramidkv": "pyramidkv:budget=96,window=16",
    "adakv": "adakv:budget=96,window=16",
    "d2o": "d2o:budget=96,window=16",
    "streamingllm": "streamingllm:budget=96,sinks=4",
    "recent": "recent:budget=96",
    "random": "random:budget=96",
    "knorm": "knorm:budget=96",
    "keydiff": "keydiff:budget=96",
    "compactor": "compactor:budget=96",
    "expected_attention": "expected_attention:budget=96,window=16",
    "ems": "ems:budget=96,window=16",
    "cam": "cam:budget=96,merge=16",
    "compresskv": "compresskv:budget=96,window=16",
    "kvcrush": "kvcrush:budget=96,window=16",
    "taskkv": "taskkv:budget=96,window=16",
    "gemfilter": "gemfilter:budget=96",
    "kvzip": "kvzip:ratio=0.5",
    "kivi": "kivi:bits=2,group=32,residual=32",
    "int8": "int8",
}


def _run(model, tok, ids, spec, kernels: bool, batch_heads: bool = True):
    cache = CompressedCache(model, create(spec))
    for layer in cache.layers:
        layer.use_decode_kernels = kernels
        layer.batch_heads = batch_heads
    with torch.inference_mode():
        first = prefill_logits(model, ids, cache, tok)
        tokens, logits = greedy(model, first, cache, 10, eos=set())
    return cache, tokens, torch.stack(logits)


def test_every_method_that_skips_statistics_is_checked_here():
    skipping = {n for n, cls in available().items() if not cls.decode_needs_attention}
    # rotatekv needs no statistics either, but its store must undo a rotation, and
    # kvcluster's centroids carry a logit bias the sparse kernel has no input for: both keep
    # the statistics path (checked below)
    assert skipping == set(SPECS) | {"rotatekv", "kvcluster"}, skipping


@pytest.mark.parametrize("name", sorted(SPECS))
def test_kernel_decode_equals_the_statistics_path(smol, name):
    model, tok = smol
    ids = tok(passage(3))["input_ids"]
    fast, tokens_fast, logits_fast = _run(model, tok, ids, SPECS[name], kernels=True)
    slow, tokens_slow, logits_slow = _run(model, tok, ids, SPECS[name], kernels=False)
    assert fast.layers[0].decodes_from_store()
    assert not slow.layers[0].decodes_from_store()
    assert tokens_fast == tokens_slow
    torch.testing.assert_close(logits_fast, logits_slow, atol=2e-3, rtol=1e-3)
    for layer in range(len(fast.layers)):
        for a, b in zip(fast.kept_positions(layer), slow.kept_positions(layer), strict=True):
            assert torch.equal(a, b)
    assert fast.nbytes() == slow.nbytes()


def test_methods_that_read_statistics_or_rotate_keep_the_statistics_path(smol):
    model, tok = smol
    ids = tok(passage(1))["input_ids"]
    for spec in ("h2o:budget=32", "tova:budget=32", "rotatekv:bits=4", "kvcluster:budget=64"):
        cache = CompressedCache(model, create(spec))
        with torch.inference_mode():
            prefill_logits(model, ids, cache)
        assert not cache.layers[0].decodes_from_store(), spec


def _keep_one_head_at_a_time(store, chosen):
    for head, index in chosen.items():
        store.keep(head, index)


@pytest.mark.parametrize(
    "spec, kernels",
    [
        ("h2o:budget=32", False),
        ("h2o:budget=32,normalise=mean", False),
        ("tova:budget=32", False),
        ("scissorhands:budget=32", False),
        ("h2o:budget=32,schedule=prefill", False),
        ("streamingllm:budget=32", True),
    ],
)
def test_batched_heads_equal_one_head_at_a_time_exactly(smol, monkeypatch, spec, kernels):
    """A decoding step that reads attention statistics attends for every KV head in one call
    when the heads hold the same number of tokens, and a continuous eviction selects every
    head's tokens with one top-k and keeps them with one gather per buffer: on SmolLM2 the
    tokens, logits and kept positions are exactly those of one head at a time."""
    model, tok = smol
    ids = tok(passage(3))["input_ids"]
    batched, tokens_b, logits_b = _run(model, tok, ids, spec, kernels=kernels)
    with monkeypatch.context() as m:  # the per-head selection and keep, as before batching
        m.setattr(EvictionMethod, "_select_together", lambda *args: None)
        m.setattr(HeadStore, "keep_heads", _keep_one_head_at_a_time)
        single, tokens_s, logits_s = _run(model, tok, ids, spec, kernels=kernels, batch_heads=False)
    assert tokens_b == tokens_s
    assert torch.equal(logits_b, logits_s)
    for layer in range(len(batched.layers)):
        assert len(set(batched.layers[layer].store.lengths())) == 1  # the batched path ran
        for a, b in zip(batched.kept_positions(layer), single.kept_positions(layer), strict=True):
            assert torch.equal(a, b)
    assert batched.nbytes() == single.nbytes()


@pytest.mark.parametrize("counts", [[5, 5, 5], [5, 3, 7]])
def test_keep_heads_equals_keep_one_head_at_a_time(counts):
    """``HeadStore.keep_heads`` (one gather per buffer when the heads keep alike) leaves every
    buffer, length and per-token state as ``keep`` head by head does."""
    torch.manual_seed(len(set(counts)))
    stores = [HeadStore(3, 8, torch.float32, "cpu") for _ in range(2)]
    keys, values = torch.randn(3, 12, 8), torch.randn(3, 12, 8)
    for store in stores:
        store.append(keys, values, torch.arange(12))
        score = store.aux_state("score")
        for h in range(3):
            score[h] += torch.arange(12.0) * (h + 1)
    picks = {h: torch.randperm(12)[:n] for h, n in enumerate(counts)}
    for h, index in picks.items():
        stores[0].keep(h, index)
    stores[1].keep_heads(picks)
    a, b = stores
    assert a.lengths() == b.lengths() == counts
    for name in ("keys", "values", "positions"):
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            assert torch.equal(x, y), name
    for x, y in zip(a.aux["score"], b.aux["score"], strict=True):
        assert torch.equal(x, y)
