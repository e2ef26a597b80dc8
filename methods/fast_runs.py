"""The decoding runs of ``methods.evaluate.compare`` on the fast decoder (``methods.fast_decode``):
on a GPU each step is one replay of a captured CUDA graph, so a sweep decodes at the speed of
its bytes rather than of Python's launches.

They give what ``evaluate.greedy`` and ``evaluate.replay`` give: the greedy tokens and the
logits that chose them, and for a method the teacher-forced logits along the full cache's
tokens plus its own greedy run. ``replay`` runs the two from one cache while they feed the same
tokens and copies it where they part; a captured step cannot fork mid-run, so here the two runs
start from two copies of the prefilled cache (the same numbers as two separate runs, which is
what ``replay`` promises). The greedy run's time is its steps, graph capture included.

Applies to the full cache and to the methods the fast decoder takes (quantised caches,
prefill-only eviction, H2O and TOVA evicting at every step) on models whose attention layers are
plain softmax over every held token (no sliding windows, no soft-capping); the full cache also
on models with sliding-window layers (Gemma 3: each such layer decodes from a ring of its
window's rows, ``fast_decode.RingLayer``).
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from methods.cache import CompressedCache
from methods.fast_decode import FastDecoder, decode_layers, eligible, layer_windows
from probes.errors import KvlensError


def plain_model(model) -> bool:
    """Whether every attention layer of ``model`` attends over all its tokens, uncapped."""
    cfg = model.config
    if getattr(cfg, "attn_logit_softcapping", None):
        return False
    types = getattr(cfg, "layer_types", None)
    if types:
        return all(t == "full_attention" for t in types)
    return not getattr(cfg, "sliding_window", None) or not getattr(cfg, "use_sliding_window", True)


def _windows(model) -> list[int | None] | None:
    """Per layer, the sliding window of the full cache's rings (None: no layer slides)."""
    windows = layer_windows(model)
    return windows if any(w is not None for w in windows) else None


def _decode_layers(model, cache, new: int):
    """``decode_layers`` for ``model``: a full cache's sliding-window layers as rings."""
    windows = _windows(model) if isinstance(cache, DynamicCache) else None
    return decode_layers(cache, new, windows)


def applies(model, cache) -> bool:
    """Whether ``cache`` (prefilled) can decode on the fast decoder with ``model``."""
    if isinstance(cache, DynamicCache):  # the full cache: sliding-window layers as rings
        cfg = model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(cfg, "attn_logit_softcapping", None):
            return False
        try:
            layer_windows(model)
        except KvlensError:
            return False
        return True
    if not plain_model(model):
        return False
    try:
        eligible(cache)
    except KvlensError:
        return False
    return True


def _seconds_since(t0: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def greedy(
    model, first_logits: torch.Tensor, cache, n: int, eos: set[int]
) -> tuple[list[int], list[torch.Tensor], FastDecoder | None]:
    """``evaluate.greedy`` on the fast decoder; also the decoder (None if no step ran), whose
    layers hold what the run kept. ``cache`` is consumed (its buffers move to the decoder)."""
    tokens, logits = [], [first_logits]
    decoder = None
    for i in range(n):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        if tok in eos or i == n - 1:
            break
        if decoder is None:
            layers = _decode_layers(model, cache, n - i)
            decoder = FastDecoder(model, layers, graph=first_logits.is_cuda)
        logits.append(decoder.step(tok).clone())
    return tokens, logits[: len(tokens)], decoder


def replay(
    model,
    first_logits: torch.Tensor,
    cache: CompressedCache,
    reference: list[int],
    n: int,
    eos: set[int],
) -> tuple[list[torch.Tensor], list[int], tuple[list[list[int]], int], float]:
    """``evaluate.replay`` with ``evaluate.compare``'s measure, on the fast decoder: the
    teacher-forced logits along ``reference``, the method's greedy tokens, (tokens each layer's
    KV heads hold and the bytes held, when the greedy run ends), its seconds."""
    forced = cache.copy()
    t0 = time.perf_counter()
    tokens, _, decoder = greedy(model, first_logits, cache, n, eos)
    own_s = _seconds_since(t0, first_logits.device)
    if decoder is None:  # the first token ended the run: the prefilled cache as it is
        kept = [[int(p.numel()) for p in cache.kept_positions(i)] for i in range(len(cache.layers))]
        measured = kept, cache.nbytes()
    else:
        measured = decoder.kept(), decoder.nbytes()
    del decoder
    return teacher_forced(model, first_logits, forced, reference), tokens, measured, own_s


def teacher_forced(model, first_logits: torch.Tensor, cache, tokens: list[int]):
    """``evaluate.teacher_forced`` on the fast decoder: the logits predicting each of
    ``tokens`` when the earlier ones are fed in. ``cache`` is consumed."""
    logits = [first_logits]
    if len(tokens) > 1:
        layers = _decode_layers(model, cache, len(tokens) - 1)
        steps = FastDecoder(model, layers, graph=first_logits.is_cuda)
        logits += [steps.step(tok).clone() for tok in tokens[:-1]]
    return logits
