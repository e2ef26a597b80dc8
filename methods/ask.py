"""Compress once, ask many: a context is compressed once, then several questions are answered
from copies of that one compressed cache, as a server would. The question is invisible to the
method at compression time. The question-aware variant compresses context + question together
(the question sits in the observation window), one compression per question, to show how much
a method depends on seeing the question.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from methods.cache import CompressedCache
from methods.evaluate import prefill_logits
from methods.registry import create, split_specs
from probes.compat import cache_arg
from probes.errors import KvlensError


@dataclass
class Answer:
    spec: str
    mode: str  # "once" (question-agnostic) or "aware"
    question: int
    text: str
    token_ids: list[int]
    agrees_with_full: bool
    correct: bool | None
    bytes: int
    time_s: float
    cache_id: int  # which compressed cache (or copy source) answered; 0 for the full cache
    compressions: int  # prefill compressions per layer behind this answer


def compress_context(model, context_ids: list[int], spec: str, tokenizer=None) -> CompressedCache:
    """Prefill ``context_ids`` through a fresh compressed cache of ``spec`` (one compression;
    ``tokenizer`` for methods whose pass after the prefill needs one, as KVzip's replay)."""
    cache = CompressedCache(model, create(spec))
    with torch.inference_mode():
        prefill_logits(model, context_ids, cache, tokenizer)
    return cache


def answer_question(
    model, cache, question_ids: list[int], max_new_tokens: int, eos: set[int]
) -> list[int]:
    """Greedy answer tokens after appending ``question_ids`` to ``cache`` (which it changes)."""
    with torch.inference_mode():
        return _answer(model, cache, question_ids, max_new_tokens, eos)


def _answer(
    model, cache, question_ids: list[int], max_new_tokens: int, eos: set[int], tokenizer=None
) -> list[int]:
    logits = prefill_logits(model, question_ids, cache, tokenizer)
    out = []
    for i in range(max_new_tokens):
        tok = int(logits.argmax())
        out.append(tok)
        if tok in eos or i == max_new_tokens - 1:
            break
        logits = model(
            input_ids=torch.tensor([[tok]], device=model.device),
            **cache_arg(model, cache),
            use_cache=True,
        ).logits[0, -1]
    return out


def ask(
    model,
    tokenizer,
    context: str,
    questions: list[str],
    specs: list[str] | str,
    *,
    answers: list[str] | None = None,
    max_new_tokens: int = 12,
    question_aware: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Answer]:
    """Answers of ``full`` and each method to every question; see the module docstring."""
    if isinstance(specs, str):
        specs = split_specs(specs)
    methods = [(s, create(s)) for s in specs]
    if not questions:
        raise KvlensError("give at least one question")
    if answers is not None and len(answers) != len(questions):
        raise KvlensError("give one answer per question, or none")
    context_ids = tokenizer(context)["input_ids"]
    question_ids = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in questions]
    if not context_ids or any(not q for q in question_ids):
        raise KvlensError("the context and every question must be non-empty")
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ctx = torch.tensor([context_ids], device=model.device)
    results: list[Answer] = []

    def correct(text: str, i: int) -> bool | None:
        return None if answers is None else answers[i].lower() in text.lower()

    with torch.inference_mode():
        base = DynamicCache()
        model(input_ids=ctx, **cache_arg(model, base), use_cache=True)
        full_answers = []
        for i, q in enumerate(question_ids):
            t0 = time.perf_counter()
            toks = _answer(model, copy.deepcopy(base), q, max_new_tokens, eos)
            full_answers.append(toks)
            text = tokenizer.decode(toks, skip_special_tokens=True)
            results.append(
                Answer(
                    "full",
                    "once",
                    i,
                    text,
                    toks,
                    True,
                    correct(text, i),
                    0,
                    time.perf_counter() - t0,
                    0,
                    0,
                )
            )
        for spec, method in methods:
            if method is None:
                continue
            if progress:
                progress(spec)
            if not question_aware:
                cache = compress_context(model, context_ids, spec, tokenizer)  # compressed once
            for i, q in enumerate(question_ids):
                t0 = time.perf_counter()
                if question_aware:
                    used = CompressedCache(model, create(spec))
                    toks = _answer(model, used, context_ids + q, max_new_tokens, eos, tokenizer)
                    source = used
                else:
                    used = cache.copy()
                    toks = _answer(model, used, q, max_new_tokens, eos)
                    source = cache
                held = used.nbytes()
                per_layer = used.prefill_compressions() // len(used.layers)
                text = tokenizer.decode(toks, skip_special_tokens=True)
                results.append(
                    Answer(
                        method.spec(),
                        "aware" if question_aware else "once",
                        i,
                        text,
                        toks,
                        toks == full_answers[i],
                        correct(text, i),
                        held,
                        time.perf_counter() - t0,
                        id(source),
                        per_layer,
                    )
                )
    return results


def answers_to_json(results: list[Answer]) -> list[dict]:
    return [asdict(r) for r in results]
