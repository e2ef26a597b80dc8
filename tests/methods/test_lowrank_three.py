"""CSKV, KV-head PCA and MatryoshkaKV on the real SmolLM2: at full rank each equals the full
cache; each keeps its defining rule, checked against float64 numpy on the captured keys and
values (CSKV: layer-wide projection of the pre-RoPE keys with a sliding full-precision
window; head PCA: a group of heads stored as one merged head; Matryoshka: nested orthonormal
PCA bases, ranks shared out by energy); bytes are the stored tensors counted by hand at
16 bits; bad parameters give one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from methods.cache import CompressedCache
from methods.registry import available, create
from probes import KvlensError, capture
from probes.compat import cache_arg
from tests.conftest import passage

N = 80
H, D, LAYERS = 3, 64, 30
FULL_RANK = {
    "cskv": "cskv:rank=192,window=8",
    "headpca": "headpca:heads_merged=3,rank=192",
    "matryoshka": "matryoshka:rank=64",
}


@pytest.fixture(scope="module")
def ids(smol):
    out = smol[1](passage(4))["input_ids"][:N]
    assert len(out) == N
    return out


@pytest.fixture(scope="module")
def full_kv(smol, ids):
    model, tok = smol
    return capture(model, tok, ids, attention="none")


def prefill(model, ids, spec, steps=0, feed=None):
    """The cache after the prompt and ``steps`` greedy tokens (or the tokens ``feed``), and
    the next-token logits after each call."""
    cache = CompressedCache(model, create(spec))
    logits = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), **cache_arg(model, cache))
        logits.append(out.logits[0, -1])
        for i in range(steps if feed is None else len(feed)):
            token = out.logits[0, -1].argmax() if feed is None else torch.tensor(feed[i])
            out = model(input_ids=token.view(1, 1), **cache_arg(model, cache))
            logits.append(out.logits[0, -1])
    cache.logits = torch.stack(logits).float()
    return cache


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def top_basis(x: np.ndarray, r: int) -> np.ndarray:
    """Top-r right singular vectors of x, as columns (numpy, float64)."""
    return np.linalg.svd(x, full_matrices=False)[2][:r].T


def close(a, b, tol=2e-2):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.abs(a - b).max() <= tol * max(1.0, np.abs(b).max())


def orthonormal(basis: torch.Tensor):
    b = np64(basis)
    close(b.T @ b, np.eye(b.shape[1]), 5e-3)


@pytest.fixture(scope="module")
def reference(smol, ids):
    """The full cache's greedy tokens after the prompt and its logits at each step."""
    model = smol[0]
    cache = DynamicCache()
    tokens, logits = [], []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), **cache_arg(model, cache))
        for _ in range(3):
            logits.append(out.logits[0, -1])
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]), **cache_arg(model, cache))
        logits.append(out.logits[0, -1])
    return tokens, torch.stack(logits).float()


@pytest.mark.parametrize("name", sorted(FULL_RANK))
def test_full_rank_equals_the_full_cache(smol, ids, full_kv, reference, name):
    tokens, want = reference
    cache = prefill(smol[0], ids, FULL_RANK[name], feed=tokens)
    # next-token distributions along the full cache's greedy run: KL ~ 0, same top-1
    logp, logq = torch.log_softmax(want, -1), torch.log_softmax(cache.logits, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    assert kl.max() < 1e-4, (name, kl.tolist())
    assert torch.equal(cache.logits.argmax(-1), want.argmax(-1))
    # the prompt's keys and values are rebuilt (the factors are float16)
    for layer in (0, 17):
        store = cache.layers[layer].store
        assert all(e is not None for e in store.encodings)
        for h in range(H):
            close(np64(store.keys[h][:N]), np64(full_kv.key(layer)[h]))
            close(np64(store.values[h][:N]), np64(full_kv.value(layer)[h]))


def test_cskv_with_the_prompt_in_its_window_is_the_full_cache(smol, ids, full_kv):
    cache = prefill(smol[0], ids, f"cskv:window={N}")
    store = cache.layers[9].store
    assert store.encodings == [None] * H
    torch.testing.assert_close(torch.stack(store.keys).float(), full_kv.key(9))


def test_cskv_projects_the_layers_pre_rope_keys_and_slides_its_window(smol, ids, full_kv):
    rk, rv, w, steps = 24, 40, 16, 3
    cache = prefill(smol[0], ids, f"cskv:rank={rk},value_rank={rv},window={w}", steps=steps)
    old = N - w
    layer = 5
    store = cache.layers[layer].store
    branch = store.encodings[0].branch
    assert all(e.branch is branch for e in store.encodings)
    assert [e.owner for e in store.encodings] == [True, False, False]
    assert branch.key_basis.shape == (H * D, rk) and branch.value_basis.shape == (H * D, rv)
    orthonormal(branch.key_basis)
    orthonormal(branch.value_basis)
    # the window is always the newest w tokens; older ones were compressed, in order
    assert branch.pos.tolist() == list(range(old + steps))
    for h in range(H):
        assert store.tail_pos[h].tolist() == list(range(old + steps, N + steps))
    # numpy: the basis spans the top-rk singular directions of the older prompt keys, before
    # RoPE, all heads side by side; the rebuilt keys are their projection
    pre = np.concatenate([np64(full_kv.key_pre_rope(layer)[h]) for h in range(H)], axis=1)
    vals = np.concatenate([np64(full_kv.value(layer)[h]) for h in range(H)], axis=1)
    pk, pv = top_basis(pre[:old], rk), top_basis(vals[:old], rv)
    close(np64(branch.key_basis) @ np64(branch.key_basis).T, pk @ pk.T)
    want_k, want_v = pre[: old + steps] @ pk @ pk.T, vals[: old + steps] @ pv @ pv.T
    for h in range(H):
        enc = store.encodings[h]
        close(np64(enc.keys_pre_rope()), want_k[:, h * D : (h + 1) * D])
        close(np64(enc.values()), want_v[:, h * D : (h + 1) * D])
    # bytes: per layer the branch (features, bases, int32 positions) once, and each head's
    # full-precision window (keys, values, int32 positions)
    n_c = old + steps
    branch_bytes = (n_c * rk + H * D * rk + n_c * rv + H * D * rv) * 2 + n_c * 4
    window_bytes = H * w * (2 * D * 2 + 4)
    assert cache.nbytes() == LAYERS * (branch_bytes + window_bytes)


def test_headpca_stores_one_merged_head_per_group(smol, ids, full_kv):
    r = 40
    cache = prefill(smol[0], ids, f"headpca:heads_merged=2,rank={r}")
    layer = 12
    a, b, c = cache.layers[layer].store.encodings
    assert a.key_merged is b.key_merged and a.value_merged is b.value_merged
    assert c.key_merged is not a.key_merged and (a.owner, b.owner, c.owner) == (True, False, True)
    assert a.key_merged.shape == (N, r) and c.key_merged.shape == (N, r)
    orthonormal(torch.cat([a.key_block, b.key_block]))  # the stacked blocks are U
    keys = [np64(full_kv.key(layer)[h]) for h in range(H)]
    values = [np64(full_kv.value(layer)[h]) for h in range(H)]
    for heads, encs in (((0, 1), (a, b)), ((2,), (c,))):
        xk = np.concatenate([keys[h] for h in heads], axis=1)
        xv = np.concatenate([values[h] for h in heads], axis=1)
        uk, uv = top_basis(xk, r), top_basis(xv, r)
        want_k, want_v = xk @ uk @ uk.T, xv @ uv @ uv.T
        for i, enc in enumerate(encs):
            close(np64(enc.keys()), want_k[:, i * D : (i + 1) * D])
            close(np64(enc.values()), want_v[:, i * D : (i + 1) * D])
    # bytes per layer and group: merged K and V [N, r] and int32 positions once, and a
    # [D, r] block for K and for V per original head
    group = lambda g: (2 * N * r + g * 2 * D * r) * 2 + N * 4  # noqa: E731
    assert cache.nbytes() == LAYERS * (group(2) + group(1))


def test_headpca_leaves_a_lone_full_width_head_as_it_is(smol, ids, full_kv):
    cache = prefill(smol[0], ids, "headpca")  # heads 0+1 merge to one head, head 2 alone
    store = cache.layers[3].store
    assert store.encodings[2] is None and store.encodings[0].key_merged.shape == (N, D)
    torch.testing.assert_close(store.keys[2].float(), full_kv.key(3)[2])
    merged = (2 * N * D + 2 * 2 * D * D) * 2 + N * 4
    assert cache.nbytes() == LAYERS * (merged + N * (2 * D * 2 + 4))


def test_matryoshka_bases_are_nested_orthonormal_pca(smol, ids, full_kv):
    rk, rv = 20, 12
    cache = prefill(smol[0], ids, f"matryoshka:allocate=uniform,rank={rk},value_rank={rv}")
    for layer in (2, 25):
        for h in range(H):
            enc = cache.layers[layer].store.encodings[h]
            assert enc.key_basis.shape == (D, rk) and enc.value_basis.shape == (D, rv)
            orthonormal(enc.key_basis)
            k, v = np64(full_kv.key(layer)[h]), np64(full_kv.value(layer)[h])
            # nested: the rank-r basis is the first r principal directions, column by column
            full = top_basis(k, D)
            cos = np.abs(np.sum(np64(enc.key_basis) * full[:, :rk], axis=0))
            assert cos.min() > 0.99, cos.min()
            pk, pv = full[:, :rk], top_basis(v, rv)
            close(np64(enc.keys()), k @ pk @ pk.T)
            close(np64(enc.values()), v @ pv @ pv.T)
    # per layer and head: float16 K U_r [N, r] and U_r [D, r] for K and V, int32 positions
    assert cache.nbytes() == LAYERS * H * ((N * rk + D * rk + N * rv + D * rv) * 2 + N * 4)


def test_matryoshka_adaptive_ranks_share_the_budget_by_energy(smol, ids, full_kv):
    r = 16
    cache = prefill(smol[0], ids, f"matryoshka:rank={r}")
    encs = [e for layer in cache.layers for e in layer.store.encodings]
    ranks = np.array([e.key_basis.shape[1] for e in encs])
    assert ranks.sum() == r * LAYERS * H and ranks.min() >= 1 and len(set(ranks)) > 1
    # numpy: each head's first component, then the largest shares of a head's own energy
    shares = []
    for layer in range(LAYERS):
        for h in range(H):
            s = np.linalg.svd(np64(full_kv.key(layer)[h]), compute_uv=False)
            shares.append(s**2 / np.sum(s**2))
    rest = sorted(((-x, i) for i, s in enumerate(shares) for x in s[1:]))
    want = np.ones(len(shares), dtype=int)
    for _x, i in rest[: r * LAYERS * H - len(shares)]:
        want[i] += 1
    assert np.abs(ranks - want).max() <= 1 and np.mean(ranks == want) > 0.9
    held = sum(
        (N * e.key_basis.shape[1] + D * e.key_basis.shape[1]) * 2
        + (N * e.value_basis.shape[1] + D * e.value_basis.shape[1]) * 2
        + N * 4
        for e in encs
    )
    assert cache.nbytes() == held


@pytest.mark.parametrize(
    "spec",
    [
        "cskv:rank=0",
        "cskv:value_rank=0",
        "cskv:window=-1",
        "headpca:heads_merged=0",
        "headpca:rank=0",
        "matryoshka:rank=0",
        "matryoshka:value_rank=-2",
        "matryoshka:allocate=best",
        "matryoshka:rank=x",
    ],
)
def test_bad_parameters_give_one_line(spec):
    with pytest.raises(KvlensError) as err:
        create(spec)
    text = str(err.value)
    assert "\n" not in text and text.startswith(spec.split(":")[0])


@pytest.mark.parametrize("name", sorted(FULL_RANK))
def test_every_parameter_has_help_and_the_method_a_paper(name):
    from app.lab_params import HELP

    cls = available()[name]
    assert cls.paper and cls.summary and cls.family == "low rank"
    assert not [p for p, _t, _d in cls.parameters() if p not in HELP]
    assert create(name).spec().startswith(name) and create(create(name).spec()) == create(name)
