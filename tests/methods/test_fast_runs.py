"""``compare`` through the fast decoder's runs (``methods.fast_runs``, stepped eagerly on the CPU)
gives what its own eager runs give, on the real SmolLM2: the same tokens, top-1 agreement, kept
tokens and bytes, the same KL and perplexity up to float32 rounding; and it is used only where
it applies."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache

from methods import fast_decode, fast_runs
from methods.cache import CompressedCache
from methods.evaluate import compare, prefill_logits
from methods.registry import create
from probes.compat import cache_arg
from tests.conftest import passage

SPECS = (
    "full,snapkv:budget=40,window=8,h2o:budget=40,tova:budget=48,streamingllm:budget=40,"
    "kivi:bits=2,group=32,residual=32"
)


def test_fast_runs_give_what_the_eager_runs_give(smol, monkeypatch):
    model, tok = smol
    ids = tok(passage(2))["input_ids"]
    # a held-out continuation: perplexity comes from a teacher-forced run along it
    kwargs = {"max_new_tokens": 12, "continuation": " His daughter Mira painted the door blue."}
    eager = compare(model, tok, ids, SPECS, fast_decode=False, **kwargs).results
    calls = []  # which runs went through the fast decoder (the real functions, counted)
    for name in ("greedy", "replay", "teacher_forced"):
        real = getattr(fast_runs, name)
        monkeypatch.setattr(
            fast_runs, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    fast = compare(model, tok, ids, SPECS, fast_decode=True, **kwargs).results
    # KIVI's step is a CUDA kernel: its runs stay eager here
    # the full cache's runs and four methods'; a replay runs a greedy and a forced run too
    assert calls[:2] == ["greedy", "teacher_forced"] and calls.count("replay") == 4
    assert calls.count("teacher_forced") == 1 + 4 + 4
    assert [r.spec for r in fast] == [r.spec for r in eager]
    for a, b in zip(fast, eager, strict=True):
        assert a.token_ids == b.token_ids, a.spec
        assert a.top1_per_step == b.top1_per_step, a.spec
        assert a.kept_per_layer == b.kept_per_layer, a.spec
        assert a.bytes == b.bytes, a.spec
        assert a.kl_per_step == pytest.approx(b.kl_per_step, abs=1e-5), a.spec
        assert math.isclose(a.ppl, b.ppl, rel_tol=1e-4), a.spec
    h2o = next(r for r in fast if r.spec.startswith("h2o"))
    assert h2o.kl_mean > 0 and all(n == [40] * 3 for n in h2o.kept_per_layer)  # evicting


def test_fast_runs_apply_only_where_the_decoder_can(smol):
    model, tok = smol
    ids = tok(passage(1))["input_ids"]
    assert fast_runs.plain_model(model)
    with torch.inference_mode():
        for spec, ok in [
            ("h2o:budget=16", True),
            ("snapkv:budget=16", True),
            ("scissorhands:budget=16", False),  # evicts at every step by its own rule
            ("kivi:bits=2", False),  # the quantised step is a CUDA kernel
        ]:
            cache = CompressedCache(model, create(spec))
            prefill_logits(model, ids, cache, tok)
            assert fast_runs.applies(model, cache) is ok, spec


def test_a_sliding_window_models_full_cache_decodes_from_rings(gemma, monkeypatch):
    """Gemma 3's local layers see the last 512 tokens: the fast decoder holds each in a ring of
    512 rows. Past the window (the rings wrap), compare's full-cache runs give the eager runs'
    tokens and perplexity, and each ring holds exactly the keys of the window's tokens."""
    model, tok = gemma
    windows = fast_decode.layer_windows(model)
    window = max(w for w in windows if w is not None)
    assert None in windows and windows.count(window) > 1  # full and sliding layers
    ids = tok(passage(12))["input_ids"][: window + 30]
    assert len(ids) == window + 30
    kwargs = {"max_new_tokens": 8, "continuation": " His daughter Mira painted the door blue."}
    eager = compare(model, tok, ids, "full", fast_decode=False, **kwargs).results[0]
    calls = []
    for name in ("greedy", "teacher_forced"):
        real = getattr(fast_runs, name)
        monkeypatch.setattr(
            fast_runs, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    fast = compare(model, tok, ids, "full", fast_decode=True, **kwargs).results[0]
    assert calls == ["greedy", "teacher_forced"]
    assert fast.token_ids == eager.token_ids
    assert math.isclose(fast.ppl, eager.ppl, rel_tol=1e-5)

    # the rings themselves, after the prefill and 5 steps, against an eager DynamicCache
    steps = 5
    with torch.inference_mode():
        cache = DynamicCache()
        first = prefill_logits(model, ids, cache, tok)
        reference = copy.deepcopy(cache)
        tokens, logits, decoder = fast_runs.greedy(model, first, cache, steps + 1, set())
        for i, token in enumerate(tokens[:-1]):
            fed = torch.tensor([[token]])
            out = model(input_ids=fed, **cache_arg(model, reference), use_cache=True)
            # the eager step's logits (SDPA under the sliding mask over every cached token):
            # equal within 3e-5 here, where a ring one row too long or short is off by 3e-2+
            gap = (out.logits[0, -1].float() - logits[i + 1]).abs().max()
            assert gap < 1e-3, (i, float(gap))
        # transformers' own sliding layers (a cache built from the config) keep window - 1
        # tokens: the rings built from them are the same
        own = DynamicCache(config=model.config)
        prefill_logits(model, ids, own, tok)
        assert own.layers[0].keys.shape[2] == window - 1
        plain = DynamicCache()
        prefill_logits(model, ids, plain, tok)
        for a, b in zip(
            fast_decode.decode_layers(own, 2, windows),
            fast_decode.decode_layers(plain, 2, windows),
            strict=True,
        ):
            assert a.n_seen == b.n_seen == len(ids) and a.kept() == b.kept()
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    n = len(ids) + steps  # tokens whose keys are cached
    for i, layer in enumerate(decoder.layers):
        full_keys = reference.layers[i].keys[0]  # [Hkv, n, D]
        assert full_keys.shape[1] == n
        if windows[i] is None:
            assert isinstance(layer, fast_decode.SparseLayer) and layer.kept() == [n]
            continue
        assert isinstance(layer, fast_decode.RingLayer) and layer.kept() == [window]
        last = torch.arange(n - window, n)  # the last window tokens, token p in row p % window
        held = layer.keys[0][:, last % window]
        prompt = last < len(ids)  # the prefill's keys moved as they were; the decoded ones
        assert torch.equal(held[:, prompt], full_keys[:, last[prompt]])  # float32 rounding
        torch.testing.assert_close(held, full_keys[:, last], rtol=1e-5, atol=1e-5)
