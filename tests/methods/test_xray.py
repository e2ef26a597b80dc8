"""The X-ray's kept sets equal the method's rule; its dropped mass equals the full model's
attention on the evicted positions, computed independently."""

from __future__ import annotations

import pytest

from methods.xray import xray
from probes import capture
from tests.conftest import passage


@pytest.fixture(scope="module")
def case(smol):
    model, tok = smol
    ids = tok(passage(4))["input_ids"][:200]
    return ids, xray(model, tok, ids, "streamingllm:budget=40,sinks=4", max_new_tokens=6)


def test_kept_sets_follow_the_method_s_rule(case):
    ids, x = case
    n = len(ids)
    prefill = x.kept.filter(step=0)
    assert prefill.height == 30 * 3
    for positions in prefill["positions"].to_list():
        assert positions == list(range(4)) + list(range(n - 36, n))
    # at decoding step s the query saw the sinks, the 36 recent tokens kept after step s-1,
    # and its own new token
    for s in range(1, 6):
        for positions in x.kept.filter(step=s)["positions"].to_list():
            assert positions == list(range(4)) + list(range(n - 37 + s, n + s))


def test_dropped_mass_equals_full_attention_on_evicted_positions(smol, case):
    model, tok = smol
    ids, x = case
    full = capture(model, tok, ids, attention="stats", kv=False, forced=x.reference)
    n = len(ids)
    for step, layer, head in ((1, 0, 0), (3, 12, 5), (5, 29, 8)):
        kept = set(range(4)) | set(range(n - 37 + step, n + step))
        rows = full.step_stats.filter(step=step, layer=layer, head=head)
        expected = sum(a for p, a in zip(rows["position"], rows["attention"]) if p not in kept)
        got = x.dropped.filter(step=step, layer=layer, head=head)["dropped_mass"][0]
        assert got == pytest.approx(expected, abs=1e-5)
    assert x.kl_per_step[0] == pytest.approx(0.0, abs=1e-5)  # prefill attends before eviction


def test_divergence_and_culprits_are_consistent(case):
    _, x = case
    if x.first_divergence is None:
        assert x.generated == x.reference and x.culprit_heads.height == 0
    else:
        assert x.generated[: x.first_divergence] == x.reference[: x.first_divergence]
        assert x.generated[x.first_divergence] != x.reference[x.first_divergence]
        if x.first_divergence > 0:
            top = x.dropped.filter(step=x.first_divergence)["dropped_mass"].max()
            assert x.culprit_heads["dropped_mass"][0] == pytest.approx(top)


def _xray_as_first_defined(model, tok, ids, spec, n):
    """The X-ray computed the first way: the full cache's greedy run, a probe of the full model
    forced along its tokens, the method's greedy run and its teacher-forced run each from its
    own prefill, and the dropped mass summed per (step, layer, head) of the probe's table."""
    import polars as pl
    import torch
    from transformers import DynamicCache

    from methods.cache import CompressedCache
    from methods.evaluate import divergence, greedy, prefill_logits, teacher_forced
    from methods.registry import create

    with torch.inference_mode():
        full_cache = DynamicCache()
        ref, ref_logits = greedy(
            model, prefill_logits(model, ids, full_cache), full_cache, n, set()
        )
        own = CompressedCache(model, create(spec))
        generated, _ = greedy(model, prefill_logits(model, ids, own), own, n, set())
        cache = CompressedCache(model, create(spec))
        cache.record_xray()
        tf = teacher_forced(model, prefill_logits(model, ids, cache), cache, ref)
    kls, _ = divergence(ref_logits, tf)
    probe = capture(model, tok, ids, attention="stats", kv=False, forced=ref)
    group = probe.model.n_heads // probe.model.n_kv_heads
    kept, seen = [], {}
    for layer, log in enumerate(cache.layers):
        for call, (_n, _tq, attended, kept_now) in enumerate(log.history):
            for h, pos in enumerate(kept_now if call == 0 else attended):
                kept.append((layer, h, call, int(pos.numel()), pos.tolist()))
                if call:
                    seen[(call, layer, h)] = set(pos.tolist())
    dropped = {}
    for row in (
        probe.step_stats.group_by("step", "layer", "head").agg("position", "attention").rows()
    ):
        step, layer, head, positions, attention = row
        if (step, layer, head // group) in seen:
            keep = seen[(step, layer, head // group)]
            dropped[(step, layer, head)] = sum(
                a for p, a in zip(positions, attention) if p not in keep
            )
    kept_df = pl.DataFrame(
        kept, schema=["layer", "kv_head", "step", "n_kept", "positions"], orient="row"
    )
    return ref, generated, kls, kept_df, dropped


@pytest.mark.parametrize("spec", ["snapkv:budget=24,window=4", "kivi:bits=2,group=32,residual=32"])
def test_the_one_pass_x_ray_gives_the_tables_of_the_first_definition(smol, spec):
    """Speed-up of issue 21 (the full run recorded once, shared method steps, tensor sums):
    tokens, KL and kept sets identical; dropped mass equal to float32 rounding (the first
    definition's probe computed the full model's outputs through the statistics kernel)."""
    model, tok = smol
    ids = tok(passage(2))["input_ids"]
    ref, generated, kls, kept, dropped = _xray_as_first_defined(model, tok, ids, spec, 6)
    x = xray(model, tok, ids, spec, max_new_tokens=6)
    assert x.reference == ref and x.generated == generated and x.kl_per_step == kls
    got = x.kept.select("layer", "kv_head", "step", "n_kept", "positions").sort(
        "layer", "kv_head", "step"
    )
    assert got.rows() == kept.sort("layer", "kv_head", "step").rows()
    assert x.dropped.height == len(dropped) > 0
    for step, layer, head, mass in x.dropped.select("step", "layer", "head", "dropped_mass").rows():
        assert mass == pytest.approx(dropped[(step, layer, head)], abs=1e-5)


def test_full_run_gives_the_greedy_logits_and_the_probe_s_rows(smol):
    import torch
    from transformers import DynamicCache

    from methods.evaluate import greedy, prefill_logits
    from methods.xray import full_run

    model, tok = smol
    ids = tok(passage(1))["input_ids"]
    run = full_run(model, ids, 5)
    with torch.inference_mode():
        cache = DynamicCache()
        ref, logits = greedy(model, prefill_logits(model, ids, cache), cache, 5, set())
    assert run.reference == ref
    assert all(torch.equal(a, b) for a, b in zip(run.logits, logits))  # no probe effect
    probe = capture(model, tok, ids, attention="stats", kv=False, forced=ref)
    assert sorted(run.rows) == sorted(
        {(s, la) for s, la in probe.step_stats.select("step", "layer").unique().rows()}
    )
    for step, layer in ((0, 0), (2, 11), (4, 29)):
        want = probe.step_stats.filter(step=step, layer=layer).sort("head", "position")["attention"]
        assert run.rows[(step, layer)].reshape(-1).tolist() == pytest.approx(
            want.to_list(), abs=1e-5
        )
