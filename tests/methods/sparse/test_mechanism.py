"""The sparse family's mechanism: a selecting method's decoding step attends exactly over
the rows it selects and nothing else, the whole cache stays, the X-ray log records the
positions each step read, and the bytes held and read follow ``methods.memory``."""

from __future__ import annotations

import pytest
import torch

from methods.base import Selection
from methods.memory import SERVING_FLOAT_BYTES
from methods.registry import available, create
from methods.sparse.store import SparseStore
from probes.errors import KvlensError
from tests.conftest import passage
from tests.methods.sparse.helpers import full_run, run

SPECS = [
    "oracle:budget=48",
    "quest:budget=48,page=16",
    "random_pages:budget=48,page=8",
    "squeezed:budget=48,clusters=8,iters=3",
]
# ShadowKV's store holds the prompt differently (its bytes: tests/methods/sparse/test_shadowkv)
KEPT = [*SPECS, "shadowkv:budget=40,outliers=2,local=16"]


@pytest.fixture(scope="module")
def ids(smol):
    return smol[1](passage(3))["input_ids"]


def test_attend_selected_is_exact_attention_over_the_selected_rows():
    torch.manual_seed(0)
    store = SparseStore(2, 16, torch.float32, "cpu")
    keys, values = torch.randn(2, 37, 16), torch.randn(2, 37, 16)
    store.append(keys, values, torch.arange(37))
    q = torch.randn(6, 16)
    sel = Selection([torch.tensor([0, 2]), torch.tensor([4])], page_size=8)
    out = store.attend_selected(q, sel, 0.3)
    for h, rows in enumerate([list(range(8)) + list(range(16, 24)), list(range(32, 37))]):
        s = torch.einsum("gd,nd->gn", q[3 * h : 3 * h + 3], keys[h, rows]) * 0.3
        want = s.softmax(-1) @ values[h, rows]
        torch.testing.assert_close(out[3 * h : 3 * h + 3], want, atol=1e-5, rtol=1e-5)
    # reading: 16 and 5 rows of keys and values at 16 bits
    assert store.read_nbytes(sel) == ((16 + 5) * 2 * 16 * SERVING_FLOAT_BYTES, 0)


def test_a_budget_past_the_length_is_the_full_cache(smol, ids):
    model, _ = smol
    _, want_tokens, want = full_run(model, ids)
    for spec in ("oracle:budget=100000", "quest:budget=100000", "random_pages:budget=100000"):
        cache, tokens, logits = run(model, ids, spec)
        assert tokens == want_tokens, spec
        torch.testing.assert_close(logits, want, atol=2e-4, rtol=1e-4)
        for layer in cache.layers:  # every step read every row
            for seen, _q, rows, lengths in layer.selections:
                assert all(r.tolist() == list(range(n)) for r, n in zip(rows, lengths))
                assert lengths == [seen] * 3


@pytest.mark.parametrize("spec", KEPT)
def test_the_whole_cache_is_kept_and_the_log_names_what_was_read(smol, ids, spec):
    model, _ = smol
    cache, tokens, _ = run(model, ids, spec)
    n = len(ids) + len(tokens) - 1
    method = create(spec)
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.store.lengths() == [n] * 3
        for pos in cache.kept_positions(layer_idx):
            assert pos.tolist() == list(range(n))
        assert len(layer.selections) == len(tokens) - 1
        for call, (seen, _q, rows, _lengths) in enumerate(layer.selections, start=1):
            _, tq, attended, kept = layer.history[call]
            assert tq == 1 and all(k.numel() == seen for k in kept)
            for r, a in zip(rows, attended):
                assert torch.equal(r, a)  # rows are positions: nothing was evicted
                assert r.numel() < seen or layer_idx < method.dense_layers
                assert (r.diff() > 0).all() and int(r[-1]) < seen


@pytest.mark.parametrize("spec", SPECS)
def test_bytes_held_and_read_are_the_stored_tensors(smol, ids, spec):
    model, _ = smol
    cache, tokens, _ = run(model, ids, spec)
    n, d = len(ids) + len(tokens) - 1, 64
    held = 0
    for layer in cache.layers:  # keys, values at 16 bits and int32 positions, per KV head
        held += 3 * n * (2 * d * SERVING_FLOAT_BYTES + 4)
        held += sum(  # summaries: floats at 16 bits, indices at their integer width
            t.numel() * (SERVING_FLOAT_BYTES if t.is_floating_point() else t.element_size())
            for t in layer.store.meta.values()
        )
    mem = cache.memory()
    assert cache.nbytes() == held and mem["device"] == held and mem["host"] == 0
    read = sum(
        sum(r.numel() for r in rows) * 2 * d * SERVING_FLOAT_BYTES
        for layer in cache.layers
        for _s, _q, rows, _n in layer.selections
    )
    assert mem["read_device"] == pytest.approx(read / (len(tokens) - 1))
    assert mem["read_per_step"] == mem["read_select"] + mem["read_device"]


def test_every_sparse_method_is_registered_in_its_family():
    sparse = {n for n, cls in available().items() if cls.family == "sparse"}
    assert {"oracle", "quest", "random_pages", "squeezed", "shadowkv"} <= sparse
    for name in sparse:
        assert available()[name].selects and available()[name].paper


@pytest.mark.parametrize(
    "spec",
    ["oracle:budget=0", "oracle:pool=sum", "quest:page=0", "quest:pool=median",
     "random_pages:page=-1", "quest:dense_layers=-1", "squeezed:clusters=0",
     "squeezed:iters=-1", "shadowkv:chunk=0", "shadowkv:rank=0", "shadowkv:outliers=-2",
     "shadowkv:pool=sum"],
)  # fmt: skip
def test_bad_parameters_give_one_line(spec):
    with pytest.raises(KvlensError) as err:
        create(spec)
    assert "\n" not in str(err.value) and str(err.value).startswith(spec.split(":")[0])
