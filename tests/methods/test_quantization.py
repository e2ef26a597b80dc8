"""The quantisation family on the real SmolLM2 and on its own store."""

from __future__ import annotations

import pytest
import torch

from kvlens_kernels.quantize import unpack_words
from methods.cache import CompressedCache, full_cache_nbytes
from methods.evaluate import compare
from methods.quantization.store import QuantHeadStore
from methods.registry import available, create
from probes.compat import cache_arg
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
    # 8-bit codes are half of a 16-bit cache; scales, zero points and the residual add to it
    assert 0.5 < kivi.bytes_ratio < 0.7


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
    lay = store.layout()
    assert lay.n_quant == 80 and lay.n_residual == 20  # 5 groups of 16; 20 stay exact
    for h in range(2):
        if grouping == "channel":
            scale = lay.key_scale[0, h, :5].float().repeat_interleave(16, 0)
            zero = lay.key_zero[0, h, :5].float().repeat_interleave(16, 0)
        else:
            scale = lay.key_scale[0, h, :80, None].float()
            zero = lay.key_zero[0, h, :80, None].float()
        err = (store.keys[h][:80] - keys[h][:80]).abs()
        bound = scale / 2 + (2**bits) * scale * 2**-11 + zero.abs() * 2**-11
        assert (err <= bound + 1e-6).all()
        assert torch.equal(store.keys[h][80:], keys[h][80:])  # the residual window is exact
        codes = unpack_words(lay.value_codes[0, h, :80], bits).float()
        want = codes * lay.value_scale[0, h, :80, None].float() + lay.value_zero[0, h, :80, None]
        torch.testing.assert_close(store.values[h][:80], want.float())


def test_byte_accounting_equals_the_stored_tensors(smol, ids):
    model, _ = smol
    cache = CompressedCache(model, create("kivi:bits=2,group=32,residual=64"))
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), **cache_arg(model, cache))
    expected = 0
    for layer in cache.layers:
        lay = layer.store.layout()
        n, r = lay.n_quant, lay.n_residual
        tensors = [
            lay.key_codes[:, :, :n], lay.key_scale[:, :, : n // 32], lay.key_zero[:, :, : n // 32],
            lay.value_codes[:, :, :n], lay.value_scale[:, :, :n], lay.value_zero[:, :, :n],
            lay.residual_keys[:, :, :r], lay.residual_values[:, :, :r],
        ]  # fmt: skip
        # a server holds the full-precision residual in 16 bits (this CPU computes in float32)
        expected += sum(
            t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors
        )
        expected += 4 * (n + r) * lay.key_codes.shape[1]  # int32 positions per KV head
    assert cache.nbytes() == expected
    # 500 tokens: 13 groups of 32 quantised (416), 84 in the residual; 2-bit codes of 64 channels
    lay = cache.layers[0].store.layout()
    assert (lay.n_quant, lay.n_residual, lay.key_codes.shape[-1]) == (416, 84, 16)
    assert cache.nbytes() < full_cache_nbytes(model, 500) / 3


@pytest.mark.parametrize(
    "name", sorted(n for n, c in available().items() if c.family == "quantisation")
)
def test_every_quantisation_method_runs_through_compare(smol, name):
    model, tok = smol
    ids = tok(passage(3))["input_ids"]
    r = compare(model, tok, ids, f"full,{name}", max_new_tokens=4).results[1]
    assert r.family == "quantisation" and 0 < r.bytes_ratio < 1 and len(r.kl_per_step) == 4
