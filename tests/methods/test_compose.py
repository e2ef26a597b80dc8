"""Composition across families (``methods.compose``) on the real SmolLM2: the composite keeps
exactly the positions the eviction alone keeps, holds the quantiser's round-trip of those
tokens, reports the bytes of the tensors it stores, decodes like its reference path, and
refuses what cannot compose in one line; the spec parsers accept ``+``."""

from __future__ import annotations

import pytest
import torch

from methods.cache import CompressedCache
from methods.evaluate import compare, prefill_logits
from methods.registry import create, split_specs
from methods.sweep import Grid
from probes.compat import cache_arg
from probes.errors import KvlensError
from tests.conftest import passage

N = 120
GROUP = 16
EVICT = "snapkv:budget=52,window=8"
QUANT = f"kivi:bits=4,group={GROUP},residual=0"


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    out = tok(passage(2))["input_ids"][:N]
    assert len(out) == N
    return out


def run(model, tok, ids, spec) -> CompressedCache:
    cache = CompressedCache(model, create(spec))
    with torch.inference_mode():
        prefill_logits(model, ids, cache, tok)
    return cache


def kivi_round_trip(keys: torch.Tensor, values: torch.Tensor, bits: int, group: int):
    """Independent KIVI round-trip of [L, D] tokens: keys per channel over each group of
    ``group`` tokens, values per token; asymmetric min-max, scale and minimum in float16; the
    last L % group tokens stay as they are."""
    levels = 2**bits - 1

    def rt(x: torch.Tensor) -> torch.Tensor:  # quantise along dim 0 of x
        lo = x.min(0).values.half().float()
        step = ((x.max(0).values.half().float() - lo) / levels).half().float()
        code = torch.round((x - lo) / step).clamp(0, levels)
        return code * step + lo

    n = keys.shape[0] // group * group
    k, v = keys.float().clone(), values.float().clone()
    for start in range(0, n, group):
        k[start : start + group] = rt(k[start : start + group])
    v[:n] = rt(v[:n].T).T
    return k, v


def test_keeps_what_the_eviction_keeps_as_the_quantisers_codes(smol, ids):
    model, tok = smol
    alone = run(model, tok, ids, EVICT)
    both = run(model, tok, ids, f"{EVICT}+{QUANT}")
    for layer in range(len(alone.layers)):
        for h, (a, b) in enumerate(zip(alone.kept_positions(layer), both.kept_positions(layer))):
            assert torch.equal(a, b), f"layer {layer} head {h}"
        kept = alone.layers[layer].store
        held = both.layers[layer].store
        assert held.quantized_tokens() > 0
        for h in range(held.n_heads):
            want_k, want_v = kivi_round_trip(kept.keys[h], kept.values[h], 4, GROUP)
            torch.testing.assert_close(held.keys[h].float(), want_k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(held.values[h].float(), want_v, atol=1e-5, rtol=1e-5)


def test_bytes_are_the_stored_tensors(smol, ids):
    model, tok = smol
    cache = run(model, tok, ids, f"{EVICT}+{QUANT}")
    d, total = 64, 0
    for layer in cache.layers:
        for n in layer.store.lengths():
            q = n // GROUP * GROUP  # quantised tokens of this head; the rest in 16 bits
            total += 2 * q * d * 4 // 8  # 4-bit key and value codes
            total += 2 * 2 * (q // GROUP) * d  # key scale and minimum per channel and group
            total += 2 * 2 * q  # value scale and minimum per token
            total += 2 * 2 * (n - q) * d  # unquantised remainder, keys and values
            total += 4 * n  # int32 positions
    assert cache.nbytes() == total
    alone = run(model, tok, ids, EVICT)
    assert cache.nbytes() < 0.4 * alone.nbytes()


def test_kvzip_then_kivi_keeps_kvzips_positions(smol, ids):
    model, tok = smol
    alone = run(model, tok, ids, "kvzip:ratio=0.4,chunk=64")
    both = run(model, tok, ids, f"kvzip:ratio=0.4,chunk=64+{QUANT}")
    for layer in range(len(alone.layers)):
        for a, b in zip(alone.kept_positions(layer), both.kept_positions(layer)):
            assert torch.equal(a, b)
    assert both.layers[0].store.quantized_tokens() > 0


def test_decode_kernel_path_equals_the_reference_path(smol, ids):
    model, tok = smol
    result = compare(model, tok, ids, f"full,{EVICT}+{QUANT}", max_new_tokens=4)
    kernel = result.results[1]
    cache = CompressedCache(model, create(f"{EVICT}+{QUANT}"))
    for layer in cache.layers:
        layer.use_decode_kernels = False
    with torch.inference_mode():
        first = prefill_logits(model, ids, cache, tok)
        tokens = [int(first.argmax())]
        for _ in range(3):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), **cache_arg(model, cache))
            tokens.append(int(out.logits[0, -1].argmax()))
    assert tokens == kernel.token_ids
    assert kernel.family == "eviction+quantisation"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("h2o:budget=32+kivi:bits=4", "schedule=prefill"),
        ("kivi:bits=4+snapkv:budget=32", "first method must evict"),
        ("snapkv:budget=32+think:prune=0.5", "second method must quantise"),
        ("snapkv:budget=32+zipcache", "token store"),
        ("snapkv:budget=32+kivi:bits=4+int8", "one '+'"),
        ("full+kivi:bits=4", "full"),
        ("snapkv:budget=32+kivi:bits=3", "bits"),
    ],
)
def test_incompatible_compositions_give_one_line(spec, words):
    with pytest.raises(KvlensError) as err:
        create(spec)
    assert "\n" not in str(err.value) and words in str(err.value)


def test_specs_with_plus_parse_everywhere():
    specs = split_specs("full,snapkv:budget=64,window=8+kivi:bits=4,group=32,h2o:budget=9")
    assert specs == ["full", "snapkv:budget=64,window=8+kivi:bits=4,group=32", "h2o:budget=9"]
    method = create(specs[1])
    assert method.spec().startswith("snapkv:budget=64,window=8,") and "+kivi:bits=4,group=32" in (
        method.spec()
    )
    assert create(method.spec()).spec() == method.spec()
    grid = Grid(methods=["kvzip:ratio=0.3+kivi:bits=2"])
    assert grid.methods == [create("kvzip:ratio=0.3+kivi:bits=2").spec()]
