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
