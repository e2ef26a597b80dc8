"""``compare`` through the fast decoder's runs (``methods.fast_runs``, stepped eagerly on the CPU)
gives what its own eager runs give, on the real SmolLM2: the same tokens, top-1 agreement, kept
tokens and bytes, the same KL and perplexity up to float32 rounding; and it is used only where
it applies."""

from __future__ import annotations

import math

import pytest
import torch

from methods import fast_runs
from methods.cache import CompressedCache
from methods.evaluate import compare, prefill_logits
from methods.registry import create
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
