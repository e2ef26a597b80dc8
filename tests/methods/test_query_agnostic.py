"""Query-agnostic eviction scorers on the real SmolLM2: with a budget above the prompt each
equals the full cache, bad parameters give one line, and each method's defining rule holds,
checked against an independent computation from a probe of the same prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.base import Observation
from methods.cache import CompressedCache, HeadStore
from methods.evaluate import compare
from methods.registry import create
from probes import capture
from probes.compat import cache_arg
from probes.errors import KvlensError
from tests.conftest import passage

N = 200
BUDGET = 64
METHODS = ("knorm", "keydiff", "expected_attention", "compactor")


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


def rope(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE at ``positions`` applied to x [..., T, D], from the model's own cos/sin."""
    cos, sin = model.model.rotary_emb(x.float(), positions[None])
    a, b = x.chunk(2, dim=-1)
    return x * cos[0] + torch.cat([-b, a], dim=-1) * sin[0]


def planted(model, noise: float, seed: int = 0):
    """A layer of 40 keys (norm 8) and 3 query heads whose last 32 pre-RoPE queries are drawn
    around one mean; key 17 points along that mean rotated to the next position (40)."""
    g = torch.Generator().manual_seed(seed)
    d, n, w = model.config.head_dim, 40, 32
    mu = 2 * torch.randn(d, generator=g)
    pre = mu + noise * torch.randn(3, w, d, generator=g)
    post = rope(model, pre, torch.arange(n - w, n))
    keys = torch.randn(n, d, generator=g)
    target = rope(model, mu[None], torch.tensor([n]))[0]
    keys[17] = target
    keys = 8 * keys / keys.norm(dim=-1, keepdim=True)
    values = torch.randn(n, d, generator=g)
    store = HeadStore(1, d, torch.float32, "cpu")
    store.append(keys[None], values[None], torch.arange(n))
    obs = Observation(
        layer=0, n_layers=1, prefill=True, n_queries=n, n_seen=n, scale=d**-0.5,
        positions=[torch.arange(n)], keys=[keys], received=None, window=None, last=None,
        window_queries=[post],
    )  # fmt: skip
    return store, obs, pre


@pytest.mark.parametrize("future", [1, 512])
def test_expected_attention_ranks_the_key_along_the_mean_query_first(smol, future):
    method = create(f"expected_attention:future={future},vnorm=false,sinks=0")
    method.setup(smol[0])
    store, obs, _ = planted(smol[0], noise=0.1)
    score = method.scores(store, obs, 0)
    assert int(score.argmax()) == 17
    assert score.sum() == pytest.approx(1.0)  # expected attention weights over the keys


def test_expected_attention_equals_the_gaussian_expectation(smol):
    """future=1: the score is E[softmax-free exp(scale q.k)] for q ~ N(mean, cov) of the
    planted queries at the next position, normalised and averaged over the group; checked
    against the closed form built from the pre-RoPE queries and by Monte Carlo sampling."""
    model = smol[0]
    method = create("expected_attention:future=1,vnorm=false,sinks=0")
    method.setup(model)
    store, obs, pre = planted(model, noise=0.5)
    got = method.scores(store, obs, 0)
    keys, scale, n = obs.keys[0], obs.scale, obs.n_seen
    want = []
    g = torch.Generator().manual_seed(1)
    for queries in pre:  # one query head at a time
        mean = rope(model, queries.mean(0)[None], torch.tensor([n]))[0]
        # RoPE at one position is linear: the covariance of rotated samples is R cov R^T
        centred = rope(model, queries - queries.mean(0), torch.full((len(queries),), n))
        cov = centred.T @ centred / len(queries)
        closed = scale * keys @ mean + 0.5 * scale**2 * ((keys @ cov) * keys).sum(-1)
        # exact draws from N(mean, cov) even though cov is singular (32 samples, 64 dims)
        z = torch.randn(200_000, len(queries), generator=g, dtype=torch.float64)
        sample = mean.double() + z @ centred.double() / len(queries) ** 0.5
        monte_carlo = torch.exp(scale * sample @ keys.double().T).mean(0).log()
        torch.testing.assert_close(monte_carlo.float(), closed, atol=0.02, rtol=0.0)
        want.append(torch.softmax(closed, dim=-1))
    torch.testing.assert_close(got, torch.stack(want).mean(0), atol=1e-5, rtol=1e-4)
    with_norm = create("expected_attention:future=1,sinks=0")
    with_norm.setup(model)
    by_value = with_norm.scores(store, obs, 0)
    torch.testing.assert_close(by_value, got * store.values[0].norm(dim=-1))


def test_expected_attention_on_smollm2_keeps_sinks_within_budget(smol, ids):
    cache = prefill(smol[0], ids, f"expected_attention:budget={BUDGET},sinks=4")
    for layer in (0, 15, 29):
        for kept in cache.kept_positions(layer):
            assert kept.numel() == BUDGET
            assert kept[:4].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("param", ["window=0", "future=0", "sinks=-1", "covariance=maybe"])
def test_expected_attention_bad_parameters_are_one_line(param):
    with pytest.raises(KvlensError) as err:
        create(f"expected_attention:{param}")
    assert "\n" not in str(err.value) and param.split("=")[0] in str(err.value)


def _numpy_leverage(k: torch.Tensor) -> np.ndarray:
    """diag(K (K^T K)^+ K^T) in float64 numpy: the projection onto K's column space."""
    x = k.double().numpy()
    return np.einsum("ij,jk,ik->i", x, np.linalg.pinv(x.T @ x), x)


def test_compactor_keeps_the_keys_of_highest_leverage(smol, ids, trace):
    cache = prefill(smol[0], ids, f"compactor:budget={BUDGET}")
    for layer in (0, 7, 15, 29):
        keys = trace.key(layer).float()
        for head, kept in enumerate(cache.kept_positions(layer)):
            lev = torch.from_numpy(_numpy_leverage(keys[head])).float()
            assert_keeps_top(kept, lev, BUDGET, f"layer {layer} head {head}")
            # not the norm rule, nor KeyDiff's
            by_norm = torch.topk(-keys[head].norm(dim=-1), BUDGET).indices.sort().values
            assert not torch.equal(kept, by_norm)


def test_compactor_sinks_stay_and_the_rest_is_leverage(smol, ids, trace):
    cache = prefill(smol[0], ids, f"compactor:budget={BUDGET},sinks=4")
    for layer in (0, 5, 29):
        keys = trace.key(layer).float()
        for head, kept in enumerate(cache.kept_positions(layer)):
            assert set(range(4)) <= set(kept.tolist()), f"layer {layer} head {head}"
            lev = torch.from_numpy(_numpy_leverage(keys[head])).float()
            lev[:4] = float("inf")  # the sinks outrank every score
            assert_keeps_top(kept, lev, BUDGET, f"layer {layer} head {head}")


def test_leverage_scores_exact_and_sketched():
    from methods.eviction.compactor import leverage_scores

    g = torch.Generator().manual_seed(3)
    k = torch.randn(300, 16, generator=g) * torch.linspace(0.1, 3, 16)  # anisotropic
    k[17] *= 25  # a key far along its own direction: high leverage
    exact = leverage_scores(k)
    np.testing.assert_allclose(exact.numpy(), _numpy_leverage(k), rtol=1e-5, atol=1e-7)
    assert exact.sum().item() == pytest.approx(16, abs=1e-4)  # sums to rank(K)
    assert int(exact.argmax()) == 17
    low_rank = k[:, :4] @ torch.randn(4, 16, generator=g)  # rank 4 (to float32 rounding)
    assert leverage_scores(low_rank).sum().item() == pytest.approx(4, abs=1e-3)
    sketched = leverage_scores(k, sketch=256, seed=1)
    corr = np.corrcoef(sketched.numpy(), exact.numpy())[0, 1]
    assert corr > 0.9 and int(sketched.argmax()) == 17
    assert not torch.equal(sketched, exact)


def test_compactor_bad_sketch_is_one_line(smol, ids):
    with pytest.raises(KvlensError, match="sketch must be >= 0"):
        create("compactor:sketch=-1")
    with pytest.raises(KvlensError) as err:
        prefill(smol[0], ids, "compactor:budget=32,sketch=8")  # fewer rows than head_dim 64
    assert "\n" not in str(err.value) and "head size 64" in str(err.value)
