"""The quantisation family on the real SmolLM2 and on its own store."""

from __future__ import annotations

import pytest
import torch

from methods.cache import CompressedCache, full_cache_nbytes
from methods.evaluate import compare
from methods.quant import dequantize
from methods.quantization.store import QuantHeadStore
from methods.registry import available, create
from tests.conftest import passage


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    out = tok(passage(9))["input_ids"][:500]
    assert len(out) == 500
    return out


def test_kivi_8bit_tracks_the_full_cache(smol, ids):
    model, tok = smol
    result = compare(model, tok, ids, "full,kivi:bits=8,group=32,residual=32", max_new_tokens=12)
    kivi = result.results[1]
    assert kivi.kl_max < 1e-3 and kivi.top1 == 1.0
    assert kivi.bytes < result.results[0].bytes / 2


def test_fewer_bits_hold_fewer_bytes_and_drift_more(smol, ids):
    model, tok = smol
    r = compare(
        model,
        tok,
        ids,
        "full,kivi:bits=8,residual=0,kivi:bits=4,residual=0,kivi:bits=2,residual=0",
        max_new_tokens=6,
    ).results
    assert r[1].bytes > r[2].bytes > r[3].bytes
    assert r[1].kl_mean <= r[2].kl_mean <= r[3].kl_mean


@pytest.mark.parametrize("grouping", ["channel", "token"])
@pytest.mark.parametrize("bits", [2, 4])
def test_dequantised_cache_within_half_a_step(grouping, bits):
    torch.manual_seed(bits)
    keys, values = torch.randn(2, 100, 64) * 2, torch.randn(2, 100, 64)
    store = QuantHeadStore(
        2,
        64,
        torch.float32,
        "cpu",
        key_bits=bits,
        value_bits=bits,
        group=16,
        residual=20,
        key_grouping=grouping,
    )
    store.append(keys, values, torch.arange(100))
    store.flush()
    for h in range(2):
        q = store.qkeys[h]
        n_q = q.packed.shape[0] * q.packed.shape[1]
        assert n_q == 80  # 5 whole groups of 16; 20 tokens stay in full precision
        err = (store.keys[h][:n_q] - keys[h][:n_q]).abs().view(5, 16, 64)
        bound = (
            q.scale.float() / 2
            + (2**bits) * q.scale.float() * 2**-11
            + q.zero.float().abs() * 2**-11
        )
        assert (err <= bound + 1e-6).all()
        assert torch.equal(store.keys[h][n_q:], keys[h][n_q:])  # the residual window is exact
        torch.testing.assert_close(
            store.values[h][:n_q], dequantize(store.qvalues[h]).reshape(-1, 64)
        )


def test_byte_accounting_equals_the_stored_tensors(smol, ids):
    model, _ = smol
    cache = CompressedCache(model, create("kivi:bits=2,group=32,residual=64"))
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), past_key_values=cache)
    expected = 0
    for layer in cache.layers:
        s = layer.store
        for h in range(s.n_heads):
            tensors = [s.res_keys[h], s.res_values[h], s.pos[h]]
            for q in (s.qkeys[h], s.qvalues[h]):
                tensors += [q.packed, q.scale, q.zero]
            expected += sum(t.numel() * t.element_size() for t in tensors)
    assert cache.nbytes() == expected
    # 500 tokens: 13 groups of 32 quantised (416), 84 in the residual; 2-bit codes of 64 channels
    s = cache.layers[0].store
    assert s.qkeys[0].packed.shape == (13, 32, 16) and s.res_keys[0].shape[0] == 84
    assert cache.nbytes() < full_cache_nbytes(model, 500) / 3


@pytest.mark.parametrize(
    "name", sorted(n for n, c in available().items() if c.family == "quantisation")
)
def test_every_quantisation_method_runs_through_compare(smol, name):
    model, tok = smol
    ids = tok(passage(3))["input_ids"]
    r = compare(model, tok, ids, f"full,{name}", max_new_tokens=4).results[1]
    assert r.family == "quantisation" and 0 < r.bytes_ratio < 1 and len(r.kl_per_step) == 4
