"""Query-agnostic eviction scorers on the real SmolLM2: with a budget above the prompt each
equals the full cache, bad parameters give one line, and each method's defining rule holds,
checked against an independent computation from a probe of the same prompt."""

from __future__ import annotations

import pytest
import torch

from methods.cache import CompressedCache
from methods.evaluate import compare
from methods.registry import create
from probes import capture
from probes.compat import cache_arg
from probes.errors import KvlensError
from tests.conftest import passage

N = 200
BUDGET = 64
METHODS = ("knorm", "keydiff")


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    out = tok(passage(4))["input_ids"][:N]
    assert len(out) == N
    return out


@pytest.fixture(scope="module")
def trace(smol, ids):
    model, tok = smol
    return capture(model, tok, ids, attention="none", kv=True)


def prefill(model, ids, spec):
    cache = CompressedCache(model, create(spec))
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), **cache_arg(model, cache))
    return cache


def assert_keeps_top(kept: torch.Tensor, score: torch.Tensor, budget: int, where: str) -> None:
    """``kept`` are the ``budget`` highest of ``score``; a swap across the boundary is allowed
    only between scores equal to float32 rounding (the cache and the probe run the same maths
    through different attention paths, so deep layers' keys differ in the last bits)."""
    want = torch.topk(score, budget).indices.sort().values
    if torch.equal(kept, want):
        return
    edge = score.sort(descending=True).values[budget - 1]
    differ = set(kept.tolist()) ^ set(want.tolist())
    close = (score[list(differ)] - edge).abs() <= 1e-5 * edge.abs().clamp(min=1.0)
    assert close.all(), f"{where}: kept {sorted(set(kept.tolist()) - set(want.tolist()))}"


def test_budget_above_length_is_the_full_cache(smol, ids):
    model, tok = smol
    specs = ",".join(f"{name}:budget=10000" for name in METHODS)
    full, *results = compare(model, tok, ids, f"full,{specs}", max_new_tokens=4).results
    # every token kept: 16-bit keys and values plus an int32 position each (methods.memory)
    d = model.config.head_dim
    for method in results:
        assert method.token_ids == full.token_ids, method.spec
        assert method.kl_max < 1e-6, method.spec
        assert method.bytes_ratio == pytest.approx((4 * d + 4) / (4 * d)), method.spec


@pytest.mark.parametrize("name", METHODS)
def test_bad_budget_is_one_line(name):
    with pytest.raises(KvlensError) as err:
        create(f"{name}:budget=0")
    assert "\n" not in str(err.value) and "budget" in str(err.value)


def test_knorm_keeps_the_lowest_norm_keys(smol, ids, trace):
    cache = prefill(smol[0], ids, f"knorm:budget={BUDGET}")
    for layer in range(trace.model.n_layers):
        keys = trace.key(layer).float()  # [Hkv, T, D] post-RoPE, from the probe
        for head, kept in enumerate(cache.kept_positions(layer)):
            assert kept.numel() == BUDGET
            norm = keys[head].norm(dim=-1)
            assert_keeps_top(kept, -norm, BUDGET, f"layer {layer} head {head}")


def test_keydiff_keeps_the_keys_least_like_the_mean_direction(smol, ids, trace):
    cache = prefill(smol[0], ids, f"keydiff:budget={BUDGET}")
    for layer in (0, 7, 15, 29):
        keys = trace.key(layer).float()
        for head, kept in enumerate(cache.kept_positions(layer)):
            k = keys[head]
            anchor = (k / k.norm(dim=-1, keepdim=True)).mean(0)
            cosine = torch.nn.functional.cosine_similarity(k, anchor[None], dim=-1)
            assert_keeps_top(kept, -cosine, BUDGET, f"layer {layer} head {head}")
            # the rule is not the key norm's: the two keep different sets here
            by_norm = torch.topk(-k.norm(dim=-1), BUDGET).indices.sort().values
            assert not torch.equal(kept, by_norm)
