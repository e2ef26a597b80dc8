"""ActQKV: the probe query and its selection equal a numpy computation of the stated rule on
crafted tensors; on SmolLM2 every step reads the newest tokens and the probe's top keys, a
window of one query is the oracle, a budget past the length is the full cache, the bytes held
are the cache and the probe window counted by hand; bad parameters are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.base import DecodeStep, Observation
from methods.memory import SERVING_FLOAT_BYTES as F16
from methods.registry import create
from methods.sparse.store import SparseStore
from probes.errors import KvlensError
from tests.conftest import passage
from tests.methods.sparse.helpers import full_run, run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def np_probe(window: np.ndarray) -> np.ndarray:
    """[H, W, D] -> [H, D]: weights = mean |z-score| over channels, normalised."""
    mean = window.mean(1, keepdims=True)
    std = np.maximum(window.std(1, keepdims=True), 1e-6)
    bias = (np.abs(window - mean) / std).mean(-1)  # [H, W]
    out = []
    for h in range(window.shape[0]):
        total = bias[h].sum()
        w = bias[h] / total if total > 0 else np.full(window.shape[1], 1 / window.shape[1])
        out.append((w[:, None] * window[h]).sum(0))
    return np.stack(out)


def np_select(probe, keys, group, scale, budget, local):
    """Rows per KV head: the ``local`` newest, then the best others by pooled softmax."""
    n = keys.shape[1]
    rows = []
    for h in range(keys.shape[0]):
        logits = probe[h * group : (h + 1) * group] @ keys[h].T * scale
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).mean(0)
        forced = list(range(n - local, n))
        others = [i for i in np.argsort(-p, kind="stable") if i < n - local]
        rows.append(sorted(forced + [int(i) for i in others[: budget - local]]))
    return rows


def test_selection_is_the_probe_query_s_top_keys_on_crafted_tensors():
    gen = torch.Generator().manual_seed(3)
    hkv, group, d, n, w = 2, 3, 8, 40, 5
    keys = torch.randn(hkv, n, d, generator=gen)
    window = torch.randn(hkv, group, w, d, generator=gen) * torch.linspace(0.2, 3, w)[:, None]
    method = create("actqkv:budget=12,window=6,local=3")
    store = SparseStore(hkv, d, torch.float32, "cpu")
    store.append(keys, torch.randn(hkv, n, d, generator=gen), torch.arange(n))
    obs = Observation(
        layer=0, n_layers=1, prefill=True, n_queries=n, n_seen=n, scale=0.5,
        positions=list(store.positions), keys=store.keys, received=None, window=None,
        last=None, window_queries=list(window),
    )  # fmt: skip
    method.compress(store, obs)
    query = torch.randn(hkv * group, d, generator=gen)
    sel = method.select(store, DecodeStep(0, 1, n, 0.5, query, group))
    # the window: the prompt's 5 last queries, then the step's query (6 = window)
    win = np.concatenate([window.reshape(hkv * group, w, d).numpy(), query[:, None].numpy()], 1)
    want = np_select(np_probe(win), keys.numpy(), group, 0.5, 12, 3)
    assert [p.tolist() for p in sel.pages] == want
    assert sel.select_bytes == (hkv * n * d + hkv * group * 6 * d) * F16
    # a second step slides the window: the oldest prompt query leaves
    q2 = torch.randn(hkv * group, d, generator=gen)
    sel2 = method.select(store, DecodeStep(0, 1, n + 1, 0.5, q2, group))
    win2 = np.concatenate([win[:, 1:], q2[:, None].numpy()], 1)
    assert [p.tolist() for p in sel2.pages] == np_select(
        np_probe(win2), keys.numpy(), 3, 0.5, 12, 3
    )


def test_probe_of_equal_queries_is_that_query():
    q = torch.randn(4, 1, 16).expand(4, 7, 16)
    from methods.sparse.actqkv import probe_query

    torch.testing.assert_close(probe_query(q), q[:, 0])


@pytest.fixture(scope="module")
def ids(smol):
    return smol[1](passage(3))["input_ids"]


def test_on_smollm2_each_step_reads_the_newest_and_the_probe_s_best(smol, ids):
    cache, _, _ = run(smol[0], ids, "actqkv:budget=40,window=8,local=8", n=4)
    n = len(ids)
    for layer in cache.layers[::7]:
        windows = [torch.zeros(9, 0, 64)]
        assert len(layer.selections) == 3
        for seen, q, rows, lengths in layer.selections:
            assert lengths == [seen] * 3
            for h in range(3):
                assert rows[h].numel() == 40
                assert set(range(seen - 8, seen)) <= set(rows[h].tolist())
            windows.append(q[:, None])
        # the held window after the last step: the step queries, the prompt's last before
        held = layer.store.meta["probe_window"].float()
        assert held.shape == (9, 8, 64)
        torch.testing.assert_close(held[:, -3:], torch.cat(windows, 1))
        keys = layer.store.dense_keys().float()
        seen, q, rows, _ = layer.selections[-1]
        want = np_select(np_probe(held.numpy()), keys[:, :seen].numpy(), 3, 0.125, 40, 8)
        assert [r.tolist() for r in rows] == want
    assert n + 3 == cache.layers[0].store.n_tokens


def test_a_window_of_one_query_is_the_oracle(smol, ids):
    a, tokens_a, logits_a = run(smol[0], ids, "actqkv:budget=32,window=1,local=0", n=3)
    b, tokens_b, logits_b = run(smol[0], ids, "oracle:budget=32", n=3)
    assert tokens_a == tokens_b
    for la, lb in zip(a.layers, b.layers, strict=True):
        for (_, _, ra, _), (_, _, rb, _) in zip(la.selections, lb.selections, strict=True):
            assert [r.tolist() for r in ra] == [r.tolist() for r in rb]
    torch.testing.assert_close(logits_a, logits_b)


def test_budget_past_the_length_is_the_full_cache_and_bytes_are_counted(smol, ids):
    _, want_tokens, want = full_run(smol[0], ids, n=4)
    cache, tokens, logits = run(smol[0], ids, "actqkv:budget=100000", n=4)
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want, atol=2e-4, rtol=1e-4)
    n = len(ids) + 3  # the prompt and three decoded tokens are held
    per_layer = 3 * n * 64 * 2 * F16 + 3 * n * 4  # keys, values (16 bits), int32 positions
    per_layer += 9 * 16 * 64 * F16  # the probe window: 16 queries of 9 heads
    assert cache.nbytes() == 30 * per_layer


@pytest.mark.parametrize(
    "spec", ["actqkv:window=0", "actqkv:local=-1", "actqkv:budget=8,local=9", "actqkv:pool=sum"]
)
def test_bad_parameters_are_one_line(spec):
    with pytest.raises(KvlensError) as err:
        create(spec)
    assert "\n" not in str(err.value) and str(err.value).startswith("actqkv:")
