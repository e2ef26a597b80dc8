"""Runs shared by the sparse family's tests: a method's greedy run with the X-ray log on,
and the full cache's run on the same prompt."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from methods.cache import CompressedCache
from methods.evaluate import greedy, prefill_logits
from methods.registry import create


def run(model, ids, spec: str, n: int = 6):
    """(cache, tokens, logits [n, V]) of ``spec``'s greedy run, every step logged."""
    cache = CompressedCache(model, create(spec))
    cache.record_xray()
    with torch.inference_mode():
        first = prefill_logits(model, ids, cache)
        tokens, logits = greedy(model, first, cache, n, eos=set())
    return cache, tokens, torch.stack(logits)


def full_run(model, ids, n: int = 6):
    """(DynamicCache, tokens, logits) of the full cache's greedy run."""
    cache = DynamicCache()
    with torch.inference_mode():
        first = prefill_logits(model, ids, cache)
        tokens, logits = greedy(model, first, cache, n, eos=set())
    return cache, tokens, torch.stack(logits)
