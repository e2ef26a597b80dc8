"""Bytes are counted as a 16-bit server holds them, for every method and the full cache.

Two independent checks: (1) the full-cache reference equals the byte count of transformers'
own cache of the same prompt, re-cast to 16 bits; (2) every method's reported bytes do not
change when every floating tensor its stores hold is re-cast to bfloat16 in place, so nothing
is counted at the compute precision (the CPU computes in float32).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from methods.cache import CompressedCache, full_cache_nbytes
from methods.evaluate import prefill_logits
from methods.memory import SERVING_FLOAT_BYTES, held_bytes
from methods.registry import available, create
from probes.compat import cache_arg
from tests.conftest import passage

N = 96

# a small budget where a method has one, so stores hold compressed tokens
SPECS = {
    "razor": "razor:recent=32",
    "duo": "duo:recent=32",
    # methods whose windows or sinks need a budget above 32
    "ems": "ems:budget=48,window=16",
    "kvcluster": "kvcluster:budget=48,recent=16",
    "kvcrush": "kvcrush:budget=48,window=16",
    "taskkv": "taskkv:budget=48,window=8,recent=16",
    "kvzip": "kvzip:ratio=0.4,recent=8",
    "gemfilter": "gemfilter:budget=32",
}


def _spec(name: str, cls) -> str:
    if name in SPECS:
        return SPECS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    return f"{name}:budget=32" if "budget" in fields else name


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    return tok(passage(3))["input_ids"][:N]


def _recast_floats(obj, seen: set[int]) -> None:
    """Re-cast, in place, every floating tensor reachable from ``obj`` to bfloat16."""
    if id(obj) in seen or isinstance(obj, str | int | float | bool | torch.nn.Module):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list):
        items = list(enumerate(obj))
    elif isinstance(obj, tuple):
        for x in obj:
            _recast_floats(x, seen)
        return
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).items())
    else:
        return
    for key, value in items:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                value = value.to(torch.bfloat16)
                if isinstance(obj, dict | list):
                    obj[key] = value
                else:
                    setattr(obj, key, value)
        else:
            _recast_floats(value, seen)


def test_full_cache_reference_is_transformers_cache_at_16_bits(smol, ids):
    model, _ = smol
    assert model.dtype == torch.float32  # the CPU computes in float32; bytes must not
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), **cache_arg(model, cache))
    held = sum(
        t.numel() * SERVING_FLOAT_BYTES
        for layer in cache.layers
        for t in (layer.keys, layer.values)
    )
    assert full_cache_nbytes(model, N) == held
    assert held_bytes(torch.zeros(3, dtype=torch.int32), torch.zeros(5, dtype=torch.uint8)) == 17


@pytest.mark.parametrize("name", sorted(available()))
def test_method_bytes_do_not_depend_on_the_compute_precision(smol, ids, name):
    model, tok = smol
    spec = _spec(name, available()[name])
    cache = CompressedCache(model, create(spec))
    with torch.inference_mode():  # the one prefill path: KVzip's replay, GemFilter's refill
        logits = prefill_logits(model, ids, cache, tok)
        for _ in range(2):
            token = logits.argmax().view(1, 1)
            logits = model(input_ids=token, **cache_arg(model, cache)).logits[0, -1]
    reported = cache.nbytes()
    assert reported > 0, spec
    seen: set[int] = set()
    for layer in cache.layers:
        _recast_floats(layer.store, seen)
    assert cache.nbytes() == reported, spec
