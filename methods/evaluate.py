"""Run one input with the full cache and with each method, and measure what compression costs.

For each method: greedy generation from the compressed cache (the text a user would get,
its wall time, the bytes the cache holds at the end) and, from a copy of the same
compressed cache, a teacher-forced pass over the full cache's own greedy continuation:
per-step KL(full || method) and top-1 agreement of the next-token distributions. Teacher
forcing keeps one early difference from compounding. Perplexity is measured on a reference
continuation, the task's gold answer when there is one, else the full cache's continuation.
The two runs of a method share every step where they feed the same token (``replay``): the
numbers are those of two separate runs, the time is the prefill plus the greedy run's steps.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from methods import fast_runs
from methods.cache import CompressedCache, full_cache_nbytes
from methods.registry import create, split_specs
from probes.capture import check_length
from probes.compat import cache_arg
from probes.errors import KvlensError
from probes.models import model_facts
from probes.resources import check_fits


@dataclass
class MethodResult:
    spec: str
    family: str
    text: str
    token_ids: list[int]
    kl_mean: float
    kl_max: float
    top1: float
    ppl: float
    accuracy: float | None
    bytes: int
    bytes_ratio: float
    time_s: float
    kl_per_step: list[float] = field(default_factory=list)
    top1_per_step: list[bool] = field(default_factory=list)
    kept_per_layer: list[list[int]] = field(default_factory=list)


@dataclass
class Comparison:
    settings: dict
    results: list[MethodResult]

    def to_json(self) -> dict:
        return {"settings": self.settings, "results": [asdict(r) for r in self.results]}


def prefill_logits(model, ids: list[int], cache, tokenizer=None) -> torch.Tensor:
    """Run the prompt into ``cache``; the next-token logits after it. The one path every
    entry point prefills through: a compressed cache then lets its method run the pass it
    needs after the prefill (``CompressedCache.prepare``: KVzip's replay, with ``tokenizer``)."""
    batch = torch.tensor([ids], device=model.device)
    out = model(input_ids=batch, **cache_arg(model, cache), use_cache=True).logits[0, -1].float()
    if isinstance(cache, CompressedCache):
        again = cache.prepare(model, ids, tokenizer)
        if again is not None:  # the method prefilled again (GemFilter): its logits count
            out = again.float()
    return out


def step_logits(model, token: int, cache) -> torch.Tensor:
    """Feed one token into ``cache``; the next-token logits after it."""
    ids = torch.tensor([[token]], device=model.device)
    return model(input_ids=ids, **cache_arg(model, cache), use_cache=True).logits[0, -1].float()


def greedy(
    model, first_logits: torch.Tensor, cache, n: int, eos: set[int]
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits that chose each of them (first from the prefill)."""
    tokens, logits = [], [first_logits]
    for i in range(n):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        if tok in eos or i == n - 1:
            break
        logits.append(step_logits(model, tok, cache))
    return tokens, logits[: len(tokens)]


def teacher_forced(model, first_logits, cache, tokens: list[int]) -> list[torch.Tensor]:
    """Logits predicting each of ``tokens`` when the earlier ones are fed in."""
    logits = [first_logits]
    for tok in tokens[:-1]:
        logits.append(step_logits(model, tok, cache))
    return logits


def replay(
    model,
    first_logits: torch.Tensor,
    cache,
    reference: list[int],
    n: int,
    eos: set[int],
    measure: Callable[[object], object] | None = None,
) -> tuple[list[torch.Tensor], list[int], object, float]:
    """Teacher-force ``reference`` through ``cache`` and run the method's own greedy tokens
    from the same prefilled cache, each step both runs share computed once.

    Gives what ``teacher_forced(model, first, copy_a, reference)`` and
    ``greedy(model, first, copy_b, n, eos)`` give on two copies of the prefilled cache: while
    the greedy token equals the reference token both runs feed the same token into the same
    state, so one call serves both; the cache is copied only where they first differ (and only
    if the teacher-forced run still needs it). ``measure(cache)`` is called on the greedy run's
    cache when that run ends (bytes held, kept tokens). Returns (teacher-forced logits, greedy
    tokens, measure's result, seconds spent on the greedy run's steps).
    """
    tf_logits, tokens = [first_logits], []
    measured, own_s = None, 0.0
    logits = first_logits
    own_cache = cache  # the greedy run's cache: the shared one until the runs part
    while True:  # the shared stretch: the greedy run has fed exactly reference[:i]
        i = len(tokens)
        tok = int(logits.argmax())
        tokens.append(tok)
        if tok in eos or i == n - 1:
            measured = measure(cache) if measure else None
            break
        tf_left = i < len(reference) - 1
        if tf_left and tok == reference[i]:
            t0 = time.perf_counter()
            logits = step_logits(model, tok, cache)
            own_s += time.perf_counter() - t0
            tf_logits.append(logits)
            continue
        own_cache = cache.copy() if tf_left else cache
        t0 = time.perf_counter()
        rest, _ = greedy(model, step_logits(model, tok, own_cache), own_cache, n - i - 1, eos)
        own_s += time.perf_counter() - t0
        tokens += rest
        measured = measure(own_cache) if measure else None
        break
    for tok in reference[len(tf_logits) - 1 : -1]:
        tf_logits.append(step_logits(model, tok, cache))
    return tf_logits, tokens, measured, own_s


def divergence(ref_logits, got_logits) -> tuple[list[float], list[bool]]:
    """Per step KL(ref || got) of next-token distributions, and top-1 agreement."""
    kls, agree = [], []
    for ref, got in zip(ref_logits, got_logits):
        ref_lp, got_lp = F.log_softmax(ref, -1), F.log_softmax(got, -1)
        kls.append(float((ref_lp.exp() * (ref_lp - got_lp)).sum()))
        agree.append(bool(ref.argmax() == got.argmax()))
    return kls, agree


def _nll(logits: list[torch.Tensor], tokens: list[int]) -> float:
    if not tokens:
        return float("nan")
    lp = torch.stack([F.log_softmax(x, -1)[t] for x, t in zip(logits, tokens)])
    return float(-lp.mean())


def compare(model, tokenizer, prompt_ids, specs, **kwargs) -> Comparison:
    """Compare ``full`` and every method spec on one prompt; see the module docstring.

    Keyword arguments: ``max_new_tokens`` (default 32), ``answers``, ``score`` (a function
    of the generated text), ``continuation`` (held-out text for perplexity), ``progress``,
    ``fast_decode`` (decode through ``methods.fast_runs`` where it applies; default: on CUDA,
    for models whose layers all attend over every token).
    Running out of memory ends in one KvlensError line.
    """
    try:
        return _compare(model, tokenizer, prompt_ids, specs, **kwargs)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise KvlensError(
            f"out of memory while comparing ({exc.__class__.__name__}); "
            "try a shorter prompt or fewer new tokens"
        ) from None


def _compare(
    model,
    tokenizer,
    prompt_ids: list[int],
    specs: list[str] | str,
    *,
    max_new_tokens: int = 32,
    answers: list[str] | None = None,
    score: Callable[[str], float] | None = None,
    continuation: str | None = None,
    progress: Callable[[str], None] | None = None,
    fast_decode: bool | None = None,
) -> Comparison:
    if isinstance(specs, str):
        specs = split_specs(specs)
    methods = [(s, create(s)) for s in specs]  # validate every spec before any work
    if max_new_tokens < 1:
        raise KvlensError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    facts = model_facts(model)
    n_prompt = len(prompt_ids)
    if n_prompt == 0:
        raise KvlensError("the prompt is empty; give some text")
    check_length(n_prompt + max_new_tokens, facts.max_positions)
    n_total = n_prompt + max_new_tokens
    kv_bytes = full_cache_nbytes(model, n_total)
    activations = 16 * n_prompt * getattr(model.config, "hidden_size", 1024) * 4 * 4
    # the full cache, its continuation copy, and up to three copies of one method's cache
    check_fits(
        5 * kv_bytes + activations,
        model.device,
        f"comparing on {n_prompt} tokens",
        "try a shorter prompt or fewer new tokens",
    )
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cont_ids = None
    if continuation:
        cont_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]

    def prefill(cache) -> torch.Tensor:
        return prefill_logits(model, prompt_ids, cache, tokenizer)

    if fast_decode is None:  # on a GPU, decode through captured steps where they apply
        # (sliding-window models' full cache, on rings, only when asked for: not yet run
        # through a captured graph on a GPU)
        fast_decode = model.device.type == "cuda" and fast_runs.plain_model(model)

    results: list[MethodResult] = []
    with torch.inference_mode():
        if progress:
            progress("full")
        t0 = time.perf_counter()
        full_cache = DynamicCache()
        full_first = prefill(full_cache)
        ref_cont_cache = copy.deepcopy(full_cache) if cont_ids else None
        if fast_decode and fast_runs.applies(model, full_cache):
            ref_tokens, ref_logits, _ = fast_runs.greedy(
                model, full_first, full_cache, max_new_tokens, eos
            )
        else:
            ref_tokens, ref_logits = greedy(model, full_first, full_cache, max_new_tokens, eos)
        full_time = time.perf_counter() - t0
        full_bytes = full_cache_nbytes(model, n_prompt + len(ref_tokens) - 1)
        if cont_ids:
            fast = fast_decode and fast_runs.applies(model, ref_cont_cache)
            forced = fast_runs.teacher_forced if fast else teacher_forced
            full_cont_logits = forced(model, full_first, ref_cont_cache, cont_ids)
            full_ppl = math.exp(_nll(full_cont_logits, cont_ids))
        else:
            full_ppl = math.exp(_nll(ref_logits, ref_tokens))
        full_text = tokenizer.decode(ref_tokens, skip_special_tokens=True)
        for spec, method in methods:
            if method is None:
                results.append(
                    MethodResult(
                        spec="full",
                        family="none",
                        text=full_text,
                        token_ids=ref_tokens,
                        kl_mean=0.0,
                        kl_max=0.0,
                        top1=1.0,
                        ppl=full_ppl,
                        accuracy=score(full_text) if score else None,
                        bytes=full_bytes,
                        bytes_ratio=1.0,
                        time_s=full_time,
                        kl_per_step=[0.0] * len(ref_tokens),
                        top1_per_step=[True] * len(ref_tokens),
                    )
                )
                continue
            if progress:
                progress(spec)
            t0 = time.perf_counter()
            cache = CompressedCache(model, method)
            first = prefill(cache)
            prefill_s = time.perf_counter() - t0
            cont_cache = cache.copy() if cont_ids else None

            def measure(own) -> tuple[list[list[int]], int]:
                kept = [
                    [int(p.numel()) for p in own.kept_positions(layer)]
                    for layer in range(facts.n_layers)
                ]
                return kept, own.nbytes()

            if fast_decode and fast_runs.applies(model, cache):
                tf_logits, tokens, (kept, nbytes), own_s = fast_runs.replay(
                    model, first, cache, ref_tokens, max_new_tokens, eos
                )
            else:  # the method's own greedy run and the teacher-forced one share common steps
                tf_logits, tokens, (kept, nbytes), own_s = replay(
                    model, first, cache, ref_tokens, max_new_tokens, eos, measure
                )
            elapsed = prefill_s + own_s
            kls, agree = divergence(ref_logits, tf_logits)
            if cont_ids:
                fast = fast_decode and fast_runs.applies(model, cont_cache)
                forced = fast_runs.teacher_forced if fast else teacher_forced
                ppl = math.exp(_nll(forced(model, first, cont_cache, cont_ids), cont_ids))
            else:
                ppl = math.exp(_nll(tf_logits, ref_tokens))
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(
                MethodResult(
                    spec=method.spec(),
                    family=method.family,
                    text=text,
                    token_ids=tokens,
                    kl_mean=sum(kls) / len(kls),
                    kl_max=max(kls),
                    top1=sum(agree) / len(agree),
                    ppl=ppl,
                    accuracy=score(text) if score else None,
                    bytes=nbytes,
                    bytes_ratio=nbytes / full_bytes,
                    time_s=elapsed,
                    kl_per_step=kls,
                    top1_per_step=agree,
                    kept_per_layer=kept,
                )
            )
    settings = {
        "model": facts.model_id,
        "n_prompt_tokens": n_prompt,
        "max_new_tokens": max_new_tokens,
        "methods": specs,
        "answers": answers,
        "continuation": continuation,
        "ppl_on": "continuation" if cont_ids else "full cache's greedy continuation",
    }
    return Comparison(settings=settings, results=results)
