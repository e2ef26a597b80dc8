"""Capture on the real SmolLM2: blockwise statistics against eager attention, keys against
the model's own cache, RoPE between pre- and post-RoPE keys, and clear errors."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from probes import KvlensError, capture
from probes.attention import attention_modules
from probes.compat import output_cache
from tests.conftest import passage


@pytest.fixture(scope="module")
def prompt_ids(smol):
    _, tok = smol
    ids = tok(passage(6))["input_ids"][:300]
    assert len(ids) == 300
    return ids


@pytest.fixture(scope="module")
def trace(smol, prompt_ids):
    model, tok = smol
    return capture(model, tok, prompt_ids, attention="full", window=16, sinks=4)


@pytest.fixture(scope="module")
def eager_attentions(smol, prompt_ids):
    model, _ = smol
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(torch.tensor([prompt_ids]), output_attentions=True, use_cache=True)
    finally:
        model.set_attn_implementation("kvlens")
    return [a[0].float() for a in out.attentions], output_cache(out)


def _key_table(trace, layer, column):
    df = trace.key_stats.filter(layer=layer).sort("head", "position")
    return torch.tensor(df[column].to_numpy()).view(trace.model.n_heads, -1)


def _query_table(trace, layer, column):
    df = trace.query_stats.filter(layer=layer).sort("head", "position")
    return torch.tensor(df[column].to_numpy()).view(trace.model.n_heads, -1)


def test_blockwise_statistics_equal_eager_probabilities(trace, eager_attentions):
    attentions, _ = eager_attentions
    assert len(attentions) == trace.model.n_layers == 30
    n = trace.n_tokens
    positions = torch.arange(n, dtype=torch.float32)
    for layer, p in enumerate(attentions):  # p: [heads, T, T]
        assert p.shape == (9, n, n)
        torch.testing.assert_close(
            _key_table(trace, layer, "received"), p.sum(1), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            _key_table(trace, layer, "window"), p[:, -16:].sum(1), atol=1e-4, rtol=1e-4
        )
        seen_by = n - positions
        torch.testing.assert_close(
            _key_table(trace, layer, "received_norm"), p.sum(1) / seen_by, atol=1e-4, rtol=1e-4
        )
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
        torch.testing.assert_close(
            _query_table(trace, layer, "entropy"), entropy, atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            _query_table(trace, layer, "sink_mass"), p[..., :4].sum(-1), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            _query_table(trace, layer, "max_prob"), p.amax(-1), atol=1e-4, rtol=1e-4
        )
        distance = positions[:, None] - positions[None, :]
        torch.testing.assert_close(
            _query_table(trace, layer, "mean_distance"),
            (p * distance).sum(-1),
            atol=1e-3,
            rtol=1e-4,
        )
        torch.testing.assert_close(trace.attn(layer).float(), p, atol=2e-3, rtol=1e-2)


def test_received_mass_sums_to_number_of_queries(trace):
    totals = trace.key_stats.group_by("layer", "head").agg(total=pl.col("received").sum())
    assert totals["total"].min() == pytest.approx(trace.n_tokens, rel=1e-4)
    assert totals["total"].max() == pytest.approx(trace.n_tokens, rel=1e-4)


def test_post_rope_keys_and_values_equal_the_model_cache(trace, eager_attentions):
    _, cache = eager_attentions
    # layer 0 sees identical inputs; deeper layers inherit float noise from eager vs blockwise
    for layer, tol in ((0, 1e-6), (7, 1e-4), (29, 1e-4)):
        torch.testing.assert_close(
            trace.key(layer), cache.layers[layer].keys[0], atol=tol, rtol=tol
        )
        torch.testing.assert_close(
            trace.value(layer), cache.layers[layer].values[0], atol=tol, rtol=tol
        )


def test_pre_rope_keys_rotate_into_post_rope_keys(smol, trace):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = smol
    pre = trace.key_pre_rope(3).unsqueeze(0)  # [1, Hkv, T, D]
    positions = torch.arange(trace.n_tokens)[None]
    cos, sin = model.model.rotary_emb(pre, positions)
    rotated, _ = apply_rotary_pos_emb(pre, pre, cos, sin)
    torch.testing.assert_close(rotated[0], trace.key(3), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(trace.key_pre_rope(3), trace.key(3), atol=1e-2)


def test_recording_does_not_change_the_model_output(smol, prompt_ids):
    model, _ = smol
    from probes.attention import Recorder, recording

    ids = torch.tensor([prompt_ids[:120]])
    with torch.inference_mode():
        plain = model(ids).logits
        with recording(Recorder(stats=True, maps=False)):
            probed = model(ids).logits
    torch.testing.assert_close(probed, plain, atol=1e-4, rtol=1e-4)


def test_layer_subset_and_modes(smol):
    model, tok = smol
    t = capture(model, tok, passage(1), attention="stats", layers=[0, 5])
    assert t.layers == [0, 5]
    assert set(t.key_stats["layer"].unique().to_list()) == {0, 5}
    assert not any(name.endswith(".attn") for name in t.tensors)
    none = capture(model, tok, passage(1), attention="none", kv=False)
    assert none.tensors == {} and none.key_stats is None
    auto = capture(model, tok, passage(1), attention="auto", layers=[1])
    assert auto.settings["attention"] == "full" and "layers.1.attn" in auto.tensors
    assert len(attention_modules(model)) == 30


def test_auto_falls_back_to_stats_when_maps_do_not_fit(smol):
    model, tok = smol
    t = capture(model, tok, passage(2), attention="auto", max_map_bytes=1000)
    assert t.settings["attention"] == "stats"
    assert t.key_stats is not None and not any(n.endswith(".attn") for n in t.tensors)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"text_or_ids": "   "}, "prompt is empty"),
        ({"text_or_ids": [1] * 9000}, "allows at most 8192"),
        ({"text_or_ids": "hi", "attention": "maps"}, "attention must be one of"),
        ({"text_or_ids": "hi", "layers": [30]}, "layers must be in 0..29"),
        ({"text_or_ids": "hi", "window": 0}, "window must be >= 1"),
    ],
)
def test_bad_input_gives_one_line_errors(smol, kwargs, message):
    model, tok = smol
    with pytest.raises(KvlensError, match=message) as info:
        capture(model, tok, **kwargs)
    assert "\n" not in str(info.value)


def test_decoding_steps_are_the_rows_of_the_queries_that_produce_each_token(smol):
    """Step s's row equals row n-1+s of an eager run over the prompt plus the generated tokens
    (computed independently), step 0 is the prompt's last query, and each step's produced
    token is the greedy choice of that query."""
    model, tok = smol
    ids = tok(passage(1))["input_ids"][:40]
    n, m = len(ids), 4
    t = capture(model, tok, ids, attention="stats", kv=False, generate=m)
    assert sorted(t.step_stats["step"].unique().to_list()) == list(range(m))
    steps = t.decode_steps()
    assert steps["query_position"].to_list() == [n - 1 + s for s in range(m)]
    assert steps["fed"][0] == ids[-1] and steps["produced"].to_list() == t.token_ids[n:]
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(torch.tensor([t.token_ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("kvlens")
    greedy = out.logits[0, n - 1 : n - 1 + m].argmax(-1).tolist()
    assert greedy == steps["produced"].to_list()
    for s, layer in ((0, 0), (0, 17), (2, 9), (3, 29)):
        expected = out.attentions[layer][0, :, n - 1 + s, : n + s].float()
        rows = t.step_stats.filter(step=s, layer=layer).sort("head", "position")
        got = torch.tensor(rows["attention"].to_numpy()).view(t.model.n_heads, -1)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-3)
