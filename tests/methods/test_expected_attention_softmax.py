"""Expected Attention's ``softmax`` setting: ``after_sinks`` (kvpress's normalisation) is the
default score renormalised over the keys after the sinks, per query head, then averaged over
the group; with one query head it ranks exactly as the default; sinks stay kept either way."""

from __future__ import annotations

import pytest
import torch

from methods.base import Observation
from methods.cache import HeadStore
from methods.registry import create
from probes.errors import KvlensError

SINKS = 4


def layer(model, n_heads: int, seed: int = 0):
    """One KV head of 40 random keys/values with ``n_heads`` query heads of 32 queries."""
    g = torch.Generator().manual_seed(seed)
    d, n, w = model.config.head_dim, 40, 32
    keys, values = 3 * torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    queries = 2 * torch.randn(n_heads, w, d, generator=g)
    store = HeadStore(1, d, torch.float32, "cpu")
    store.append(keys[None], values[None], torch.arange(n))
    obs = Observation(
        layer=0, n_layers=1, prefill=True, n_queries=n, n_seen=n, scale=d**-0.5,
        positions=[torch.arange(n)], keys=[keys], received=None, window=None, last=None,
        window_queries=[queries],
    )  # fmt: skip
    return store, obs


def scores(model, spec: str, store, obs) -> torch.Tensor:
    method = create(spec)
    method.setup(model)
    return method.scores(store, obs, 0)


@pytest.mark.parametrize("n_heads", [1, 3])
def test_after_sinks_is_each_heads_softmax_over_the_later_keys(smol, n_heads):
    model = smol[0]
    base = f"expected_attention:future=16,vnorm=false,sinks={SINKS},window=32"
    # the default's per-head weights, one query head at a time
    store, obs = layer(model, n_heads)
    per_head = []
    for h in range(n_heads):
        one = Observation(**{**obs.__dict__, "window_queries": [obs.window_queries[0][h : h + 1]]})
        per_head.append(scores(model, base, store, one))
    want = torch.stack([p[SINKS:] / p[SINKS:].sum() for p in per_head]).mean(0)
    got = scores(model, base + ",softmax=after_sinks", store, obs)
    torch.testing.assert_close(got[SINKS:], want, atol=1e-6, rtol=1e-5)
    assert got[:SINKS].abs().max() == 0  # no weight on the sinks (they are protected)
    if n_heads == 1:  # one head: the same order of the later keys as the default
        default = scores(model, base, store, obs)
        assert torch.equal(default[SINKS:].argsort(), got[SINKS:].argsort())


def test_after_sinks_keeps_the_sinks(smol):
    model = smol[0]
    store, obs = layer(model, 3)
    method = create(f"expected_attention:budget=10,sinks={SINKS},window=32,softmax=after_sinks")
    method.setup(model)
    kept = method.select(store, obs, 0, 10).sort().values
    assert kept[:SINKS].tolist() == list(range(SINKS))


def test_bad_softmax_is_one_line():
    with pytest.raises(KvlensError) as err:
        create("expected_attention:softmax=sometimes")
    assert "\n" not in str(err.value) and "softmax" in str(err.value)
