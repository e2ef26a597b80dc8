"""A^2ATS: on crafted tensors a codebook of one code per key retrieves the exact top-k, a
small codebook retrieves by its reconstructions as a numpy computation does, codes are their
keys' means and the query-aware metric clusters along what the queries read; on SmolLM2 the
windowed RoPE retrieval equals a numpy RoPE computation, a budget past the length is the full
cache, and the bytes held (device / host) and read are the stored tensors counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.base import DecodeStep, Observation
from methods.memory import SERVING_FLOAT_BYTES as F16
from methods.registry import create
from probes.errors import KvlensError
from tests.conftest import passage
from tests.methods.sparse.helpers import full_run, run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def np_top(logits: np.ndarray, group: int, budget: int, always: list[int]) -> list[list[int]]:
    """Per KV head: ``always`` rows, then the best others by the group's mean softmax."""
    rows = []
    for h in range(logits.shape[0] // group):
        s = logits[h * group : (h + 1) * group]
        p = np.exp(s - s.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).mean(0)
        others = [int(i) for i in np.argsort(-p, kind="stable") if i not in always]
        rows.append(sorted(always + others[: max(0, budget - len(always))]))
    return rows


def assert_reads_the_best(pages, logits, group, budget, always, tol=1e-7):
    """Each KV head reads ``always`` and ``budget`` rows in all, none scored below a row it
    left (tokens of one code, or repeated tokens under windowed RoPE, tie)."""
    for h, page in enumerate(pages):
        s = logits[h * group : (h + 1) * group]
        p = np.exp(s - s.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).mean(0)
        read = page.tolist()
        assert len(read) == max(budget, len(always)) and set(always) <= set(read)
        chosen = [i for i in read if i not in always]
        unread = sorted(set(range(len(p))) - set(read))
        if chosen and unread:
            assert p[chosen].min() >= p[unread].max() - tol * p.max()


def crafted(spec: str, keys: torch.Tensor, window: torch.Tensor):
    method = create(spec)
    hkv, n, d = keys.shape
    store = method.new_store(hkv, d, torch.float32, "cpu")
    store.append(keys, torch.randn(hkv, n, d), torch.arange(n))
    obs = Observation(
        layer=0, n_layers=1, prefill=True, n_queries=n, n_seen=n, scale=0.25,
        positions=list(store.positions), keys=store.keys, received=None, window=None,
        last=None, window_queries=list(window),
    )  # fmt: skip
    method.compress(store, obs)
    return method, store


@pytest.mark.parametrize("query_aware", [False, True])
def test_one_code_per_key_retrieves_the_exact_top_k(query_aware):
    gen = torch.Generator().manual_seed(5)
    hkv, g, d, n = 2, 3, 16, 50
    keys = torch.randn(hkv, n, d, generator=gen)
    window = torch.randn(hkv, g, 8, d, generator=gen)
    spec = f"a2ats:budget=14,clusters=1000,local=4,windowed=False,query_aware={query_aware}"
    method, store = crafted(spec, keys, window)
    assert store.meta["codes"].dtype == torch.uint8 and store.meta["codes"].shape == (2, 46)
    torch.testing.assert_close(
        store.meta["codebook"][0, store.meta["codes"][0].long()], keys[0, :46]
    )
    q = torch.randn(hkv * g, d, generator=gen)
    sel = method.select(store, DecodeStep(0, 1, n, 0.25, q, g))
    logits = np.stack([q[j].numpy() @ keys[j // g].numpy().T * 0.25 for j in range(hkv * g)])
    assert [p.tolist() for p in sel.pages] == np_top(logits, g, 14, list(range(46, 50)))
    assert sel.select_bytes == 2 * 46 * d * F16 + 2 * 46 * 1  # codebook and uint8 codes


def test_a_small_codebook_retrieves_by_its_reconstructions():
    gen = torch.Generator().manual_seed(6)
    hkv, g, d, n = 2, 3, 8, 60
    keys = torch.randn(hkv, n, d, generator=gen)
    spec = "a2ats:budget=20,clusters=5,local=6,windowed=False,query_aware=False"
    method, store = crafted(spec, keys, torch.randn(hkv, g, 4, d, generator=gen))
    book, codes = store.meta["codebook"], store.meta["codes"].long()
    for h in range(hkv):  # each code is the mean of its keys
        for c in codes[h].unique():
            torch.testing.assert_close(book[h, c], keys[h, :54][codes[h] == c].mean(0))
    q = torch.randn(hkv * g, d, generator=gen)
    sel = method.select(store, DecodeStep(0, 1, n, 0.25, q, g))
    logits = []
    for j in range(hkv * g):
        h = j // g
        recon = book[h].numpy()[codes[h].numpy()]
        logits.append(np.concatenate([recon, keys[h, 54:].numpy()]) @ q[j].numpy() * 0.25)
    assert_reads_the_best(sel.pages, np.stack(logits), g, 20, list(range(54, 60)))


def test_query_aware_codes_split_along_the_channel_the_queries_read():
    gen = torch.Generator().manual_seed(7)
    n, d = 80, 4
    a, b = torch.randint(2, (n,), generator=gen), torch.randint(2, (n,), generator=gen)
    keys = torch.zeros(1, n, d)
    keys[0, :, 0] = a * 10.0  # wide, but no query reads channel 0
    keys[0, :, 1] = b * 1.0  # narrow, what the queries read
    keys += torch.randn(1, n, d, generator=gen) * 0.01
    window = torch.zeros(1, 2, 16, d)
    window[..., 1] = torch.randn(1, 2, 16, generator=gen) + 3
    base = "a2ats:clusters=2,local=0,windowed=False,iters=20"
    _, plain = crafted(f"{base},query_aware=False", keys, window)
    _, aware = crafted(f"{base},query_aware=True", keys, window)
    same = lambda codes, truth: (codes == codes[0]).eq(truth == truth[0]).all()  # noqa: E731
    assert same(plain.meta["codes"][0], a) and not same(plain.meta["codes"][0], b)
    assert same(aware.meta["codes"][0], b)


def np_rope(x: np.ndarray, pos: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Rotate-half RoPE of rows ``x`` [N, 64] at ``pos`` [N], theta 100000 (SmolLM2)."""
    inv = 1.0 / 100000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64)
    ang = pos[:, None].astype(np.float64) * np.concatenate([inv, inv])[None]
    cos, sin = np.cos(ang), np.sin(ang) * (-1 if inverse else 1)
    swapped = np.concatenate([-x[:, 32:], x[:, :32]], 1)
    return x * cos + swapped * sin


@pytest.fixture(scope="module")
def ids(smol):
    return smol[1](passage(3))["input_ids"]


def test_windowed_rope_retrieval_equals_numpy_at_one_code_per_key(smol, ids):
    cache, _, _ = run(smol[0], ids, "a2ats:budget=48,clusters=100000,local=16", n=3)
    n = len(ids)
    for layer in cache.layers[::9]:
        keys = layer.store.dense_keys().double().numpy()
        assert layer.store.n_coded == n - 16
        for seen, q, rows, _ in layer.selections:
            logits = []
            for j in range(9):
                k = keys[j // 3, :seen]
                pre = np_rope(k[: n - 16], np.arange(n - 16), inverse=True)
                qw = np_rope(
                    np_rope(q[j : j + 1].double().numpy(), np.array([seen - 1]), inverse=True),
                    np.array([16]),
                )[0]
                exact = k[n - 16 :] @ q[j].double().numpy()
                logits.append(np.concatenate([pre @ qw, exact]) * 0.125)
            # repeated tokens' pre-RoPE keys tie (exactly, in layer 0): the best, up to ties
            assert_reads_the_best(rows, np.stack(logits), 3, 48, list(range(n - 16, seen)), 1e-5)


def test_budget_past_the_length_is_the_full_cache_and_bytes_are_counted(smol, ids):
    _, want_tokens, want = full_run(smol[0], ids, n=4)
    cache, tokens, logits = run(smol[0], ids, "a2ats:budget=100000,clusters=16", n=4)
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want, atol=2e-4, rtol=1e-4)
    n, coded = len(ids) + 3, len(ids) - 32
    row = 2 * 64 * F16  # a key and a value at 16 bits
    host = 3 * coded * row
    device = 3 * (n - coded) * row + 3 * n * 4  # exact rows, int32 positions of every row
    device += 3 * 16 * 64 * F16 + 3 * coded * 1  # codebook, uint8 codes
    mem = cache.memory()
    assert mem["host"] == 30 * host and mem["device"] == 30 * device
    # every row is read; the coded ones from the host; the selection reads codebook + codes
    assert mem["read_host"] == 30 * host
    assert mem["read_select"] == 30 * (3 * 16 * 64 * F16 + 3 * coded)


def test_a_small_budget_reads_the_budget(smol, ids):
    cache, _, _ = run(smol[0], ids, "a2ats:budget=40,clusters=8,local=8", n=3)
    for layer in cache.layers[::10]:
        for seen, _, rows, _ in layer.selections:
            for r in rows:
                assert r.numel() == 40 and set(range(len(ids) - 8, seen)) <= set(r.tolist())


@pytest.mark.parametrize(
    "spec", ["a2ats:clusters=0", "a2ats:local=-1", "a2ats:calib=0", "a2ats:pool=sum"]
)
def test_bad_parameters_are_one_line(spec):
    with pytest.raises(KvlensError) as err:
        create(spec)
    assert "\n" not in str(err.value) and str(err.value).startswith("a2ats:")
