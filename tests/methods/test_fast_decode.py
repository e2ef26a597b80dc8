"""The fast decoder's on-device eviction (H2O, TOVA, StreamingLLM at every step) run eagerly on
the CPU with the real SmolLM2 gives what the eager path of ``methods.cache`` gives: the same greedy
tokens, the same kept positions, keys and scores per head, the same bytes; and refuses what it
cannot run."""

from __future__ import annotations

import pytest
import torch

from methods.cache import CompressedCache
from methods.fast_decode import EvictingLayer, FastDecoder, decode_layers
from methods.registry import create
from probes.compat import cache_arg
from probes.errors import KvlensError
from tests.conftest import passage

NEW = 16


def _prefill(model, ids, cache):
    out = model(input_ids=ids, **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def _eager(model, ids, spec):
    cache = CompressedCache(model, create(spec))
    tok = _prefill(model, ids, cache)
    tokens = []
    for _ in range(NEW):
        out = model(input_ids=tok, **cache_arg(model, cache), use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(tok))
    return tokens, cache


@pytest.fixture(scope="module")
def ids(smol):
    _, tokenizer = smol
    return torch.tensor([tokenizer(passage(2))["input_ids"]])


@pytest.mark.parametrize(
    "spec",
    [
        # (tests/methods/test_fast_runs.py runs h2o:budget=40 and tova:budget=48 through compare)
        "h2o:budget=40,recent=0,normalise=mean",
        "tova:budget=48,average=group",
        "h2o:budget=130",  # above the prompt: the cache fills up while decoding, then evicts
        "streamingllm:budget=48,sinks=4",  # ranked by position, attending through the kernel
    ],
)
def test_device_eviction_equals_the_eager_statistics_path(smol, ids, spec):
    model, _ = smol
    with torch.inference_mode():
        expected, eager_cache = _eager(model, ids, spec)
        cache = CompressedCache(model, create(spec))
        first = _prefill(model, ids, cache)
        layers = decode_layers(cache, NEW + 1)
        assert all(isinstance(layer, EvictingLayer) for layer in layers)
        decoder = FastDecoder(model, layers, graph=False)
        got = decoder.generate(first, NEW).tolist()
    assert got == expected
    assert len(set(got)) > 1
    assert ids.shape[1] + NEW > create(spec).budget  # every run evicts while decoding
    assert decoder.nbytes() == eager_cache.nbytes()
    for layer, eager in zip(layers, eager_cache.layers, strict=True):
        n = int(layer.lengths)
        store = eager.store
        for h, pos in enumerate(store.positions):
            assert layer.positions[h, :n].tolist() == pos.tolist()
            torch.testing.assert_close(layer.keys[h, :n], store.keys[h], rtol=0, atol=0)
            if "h2o_score" in store.aux:  # H2O's accumulated attention, kept with its rows
                score = store.aux["h2o_score"][h]
                torch.testing.assert_close(layer.score[h, :n], score, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["scissorhands:budget=64", "keyformer:budget=64"])
def test_other_decoding_evictions_are_refused(smol, ids, spec):
    model, _ = smol
    with torch.inference_mode():
        cache = CompressedCache(model, create(spec))
        _prefill(model, ids, cache)
        with pytest.raises(KvlensError, match="fast decoder takes"):
            decode_layers(cache, 4)
