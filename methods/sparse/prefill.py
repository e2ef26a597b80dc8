"""Prefill-side sparse attention inside the model: the prompt's prefill runs with a block mask
(XAttention, MInference vertical-slash) or PSA's pooled levels, then decoding is normal.

The masks and pooled attention are ``analysis.prefill_sparse``'s (see there for the papers and
departures). Here they run inside a real prefill through kvlens's attention path: a forward
pre-hook on each attention module hands a one-call layer object to
``probes.attention.hand_over``, so kvlens's attention function lets it compute that layer's
prefill output (the method's mask chosen from the layer's own queries and keys, as the
methods do at run time) instead of full causal attention. Hooks are installed once per model
and inert unless ``masked_prefill`` is active in the calling context; the cache still holds
every key and value (these methods save prefill compute, not memory), so decoding afterwards
attends over the whole cache as usual. Later layers see the earlier layers' approximated
outputs, so the density and recall logged per layer are those of the masked run.

``prefill_compare`` measures the effect on the answer: the full prefill's greedy continuation
is the reference; each method's masked prefill is teacher-forced along it (per-step KL and
top-1 agreement) and its own greedy continuation is scored on the task's answers.
"""

from __future__ import annotations

import contextvars
import copy
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from analysis.prefill_sparse import (
    PSA,
    PrefillMethod,
    VerticalSlash,
    XAttention,
    evaluate,
)
from methods.evaluate import divergence, greedy, prefill_logits, teacher_forced
from probes.attention import attention_modules, hand_over
from probes.errors import KvlensError

_ACTIVE: contextvars.ContextVar[tuple[PrefillMethod, list] | None] = contextvars.ContextVar(
    "kvlens_masked_prefill", default=None
)


@dataclass
class _OneCall:
    """What a pre-hook hands over: attends one layer's prefill with the method."""

    layer_idx: int
    method: PrefillMethod
    log: list

    def attend(self, query, key, value, *, scale, sliding_window=None, softcap=None):
        if sliding_window is not None or softcap is not None:
            raise KvlensError(
                "masked prefill supports neither sliding-window nor soft-capped layers"
            )
        if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
            raise KvlensError("masked prefill runs one sequence's whole prompt in one call")
        q, k, v = query[0].float(), key[0].float(), value[0].float()
        got, out = evaluate(q, k, v, scale, self.method, return_output=True)
        self.log.append((self.layer_idx, {n: float(x.mean()) for n, x in got.items()}))
        return out.to(query.dtype)[None]


def _install(model) -> None:
    if getattr(model, "_kvlens_prefill_hooked", False):
        return
    for attn in attention_modules(model):

        def pre(_mod, _args, layer=attn.layer_idx):
            active = _ACTIVE.get()
            if active is not None:
                hand_over(_OneCall(layer, active[0], active[1]))

        attn.register_forward_pre_hook(pre)
    model._kvlens_prefill_hooked = True


class masked_prefill:
    """Context manager: model calls inside it attend with ``method``'s prefill mask; ``log``
    collects (layer, mean density / recall / min_recall / output_error) per attention call."""

    def __init__(self, model, method: PrefillMethod) -> None:
        _install(model)
        self.method = method
        self.log: list = []
        self._token: contextvars.Token | None = None

    def __enter__(self) -> masked_prefill:
        self._token = _ACTIVE.set((self.method, self.log))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)


@dataclass
class PrefillRun:
    config: str
    text: str
    kl_per_step: list[float]
    top1: float
    accuracy: float | None
    per_layer: list = field(default_factory=list)  # (layer, {density, recall, ...})

    def summary(self) -> dict:
        mean = {
            name: sum(d[name] for _, d in self.per_layer) / len(self.per_layer)
            for name in ("density", "recall", "output_error")
        }
        return {
            "config": self.config,
            "accuracy": self.accuracy,
            "kl_mean": sum(self.kl_per_step) / len(self.kl_per_step),
            "kl_first": self.kl_per_step[0],
            "top1": self.top1,
            **mean,
            "text": self.text,
        }


def prefill_compare(
    model,
    tokenizer,
    ids: list[int],
    methods: list[PrefillMethod],
    *,
    max_new_tokens: int = 12,
    score=None,
) -> tuple[PrefillRun, list[PrefillRun]]:
    """The full prefill's run (reference, KL 0) and one run per method, all greedy.

    ``score(text) -> float`` (e.g. ``Task.score``) gives each run's accuracy."""
    if max_new_tokens < 1:
        raise KvlensError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    with torch.inference_mode():
        full_cache = DynamicCache()
        first = prefill_logits(model, ids, full_cache)
        reference, ref_logits = greedy(model, first, full_cache, max_new_tokens, eos)
        text = tokenizer.decode(reference)
        full = PrefillRun("full", text, [0.0] * len(reference), 1.0, score(text) if score else None)
        runs = []
        for method in methods:
            cache = DynamicCache()
            with masked_prefill(model, method) as mp:
                own_first = prefill_logits(model, ids, cache)
            other = copy.deepcopy(cache)
            tf = teacher_forced(model, own_first, cache, reference)
            own, _ = greedy(model, own_first, other, max_new_tokens, eos)
            kls, agree = divergence(ref_logits, tf)
            own_text = tokenizer.decode(own)
            runs.append(
                PrefillRun(
                    method.label(),
                    own_text,
                    kls,
                    sum(agree) / len(agree),
                    score(own_text) if score else None,
                    mp.log,
                )
            )
    return full, runs


__all__ = ["PSA", "PrefillRun", "VerticalSlash", "XAttention", "masked_prefill", "prefill_compare"]
