"""Run a multi-chunk prompt with the full prefill and with each chunk-reuse method, and measure
what reuse costs: the answer and its accuracy, teacher-forced KL(full || method) and top-1
agreement over the full prefill's greedy continuation, the share of chunk tokens recomputed,
and prefill FLOPs by each method's schedule (chunk caches come from earlier requests: free).

FLOPs per layer: 2 x (the layer's parameters) per computed token, plus 4 x Hq x D per
(query, key) pair it attends to (causal), plus the key/value projections of a check layer.
Bytes: chunk reuse stores every token's keys and values, so each method holds the full
cache's bytes (``methods.memory``'s rule) and pays the chunk caches' storage instead.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from methods.cache import full_cache_nbytes
from methods.evaluate import divergence, greedy, teacher_forced
from methods.registry import split_specs
from methods.reuse import create_reuse
from methods.reuse.base import Context, Layout, Schedule
from methods.reuse.cache import ReuseCache
from probes.capture import check_length
from probes.errors import KvlensError
from probes.models import model_facts


@dataclass
class ReuseResult:
    spec: str
    text: str
    token_ids: list[int]
    accuracy: float | None
    kl_mean: float
    kl_max: float
    top1: float
    recomputed: float  # share of chunk tokens recomputed at the last layer
    flops: float
    flops_saved: float  # 1 - flops / full prefill's flops
    bytes: int
    time_s: float
    kl_per_step: list[float] = field(default_factory=list)
    notes: dict = field(default_factory=dict)


@dataclass
class ReuseRun:
    settings: dict
    results: list[ReuseResult]
    #: per spec: per layer context keys/values [Hkv, n, D] and the question's attention rows
    #: [Hq, q, n_prompt] (kept with ``keep_tensors``), for ``analysis.chunk_reuse``
    tensors: dict[str, dict[str, list[torch.Tensor]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"settings": self.settings, "results": [asdict(r) for r in self.results]}


def layer_params(model) -> float:
    """Parameters of one decoder layer (all but embeddings and the output head, averaged)."""
    facts = model_facts(model)
    total = sum(
        p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n
    )
    return total / facts.n_layers


def prefill_flops(model, layout: Layout, schedule: Schedule) -> float:
    """FLOPs of a prefill that computes ``schedule`` and then the question (see module doc)."""
    facts = model_facts(model)
    hidden = model.config.get_text_config().hidden_size
    per_token = 2 * layer_params(model)
    per_pair = 4 * facts.n_heads * facts.head_dim
    question = torch.arange(layout.n_context, layout.n_context + len(layout.question))
    flops = 0.0
    for layer in range(facts.n_layers):
        pos = torch.cat([schedule.computed[layer].long(), question])
        flops += per_token * pos.numel() + per_pair * float((pos + 1).sum())
        if layer in schedule.projected:
            flops += (
                schedule.projected[layer].numel()
                * 2
                * 2
                * facts.n_kv_heads
                * facts.head_dim
                * hidden
            )
    return flops


def _context_tensors(cache: ReuseCache, n: int) -> dict[str, list[torch.Tensor]]:
    layers = range(len(cache.layers))
    return {
        "keys": [cache.keys(i)[:, :n].float().cpu().clone() for i in layers],
        "values": [cache.values(i)[:, :n].float().cpu().clone() for i in layers],
        "rows": [cache.layers[i].rows for i in layers],
    }


def reuse_compare(
    model,
    tokenizer,
    layout: Layout,
    specs: list[str] | str,
    *,
    max_new_tokens: int = 12,
    score: Callable[[str], float] | None = None,
    rotation: str = "delta",
    keep_tensors: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ReuseRun:
    """The full prefill and every reuse spec on one chunked prompt; see the module docstring."""
    if isinstance(specs, str):
        specs = split_specs(specs)
    methods = [(s, create_reuse(s)) for s in specs]  # validate every spec before any work
    if max_new_tokens < 1:
        raise KvlensError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    ctx = Context(model, layout, rotation)
    n_prompt = layout.n_context + len(layout.question)
    check_length(n_prompt + max_new_tokens, model_facts(model).max_positions)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    n_chunk_tokens = layout.n_context - len(layout.header)
    with torch.inference_mode():
        if progress:
            progress("full")
        t0 = time.perf_counter()
        full = ReuseCache(model)
        first = full.run(model, layout.ids, list(range(n_prompt)), record_last=len(layout.question))
        ref_tokens, ref_logits = greedy(model, first, full.to_dynamic(), max_new_tokens, eos)
        full_time = time.perf_counter() - t0
        all_pos = torch.arange(layout.n_context)
        full_flops = prefill_flops(model, layout, Schedule([all_pos] * ctx.n_layers))
        nbytes = full_cache_nbytes(model, n_prompt)
        tensors = {"full": _context_tensors(full, layout.n_context)} if keep_tensors else {}
        full_text = tokenizer.decode(ref_tokens, skip_special_tokens=True)
        results = []
        for spec, method in methods:
            if method is None:
                results.append(
                    ReuseResult("full", full_text, ref_tokens, score(full_text) if score else None,
                                0.0, 0.0, 1.0, 1.0, full_flops, 0.0, nbytes, full_time,
                                [0.0] * len(ref_tokens))
                )  # fmt: skip
                continue
            if progress:
                progress(spec)
            t0 = time.perf_counter()
            cache, logits, schedule, notes = method.run(ctx)
            dyn = cache.to_dynamic()
            tf_cache = copy.deepcopy(dyn)
            tokens, _ = greedy(model, logits, dyn, max_new_tokens, eos)
            elapsed = time.perf_counter() - t0
            tf_logits = teacher_forced(model, logits, tf_cache, ref_tokens)
            kls, agree = divergence(ref_logits, tf_logits)
            chunk_pos = ctx.layout.chunk_positions()
            last = schedule.computed[-1]
            recomputed = float(torch.isin(chunk_pos, last).float().sum()) / max(1, n_chunk_tokens)
            flops = prefill_flops(model, layout, schedule)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(
                ReuseResult(method.spec(), text, tokens, score(text) if score else None,
                            sum(kls) / len(kls), max(kls), sum(agree) / len(agree), recomputed,
                            flops, 1.0 - flops / full_flops, nbytes, elapsed, kls, notes)
            )  # fmt: skip
            if keep_tensors:
                tensors[method.spec()] = _context_tensors(cache, layout.n_context)
    settings = {
        "model": model_facts(model).model_id,
        "n_prompt_tokens": n_prompt,
        "n_chunks": len(layout.chunks),
        "chunk_lengths": [len(c) for c in layout.chunks],
        "header_tokens": len(layout.header),
        "max_new_tokens": max_new_tokens,
        "rotation": rotation,
        "methods": specs,
    }
    return ReuseRun(settings, results, tensors)


def task_layout(task, tokenizer) -> Layout:
    """The Layout of a ``probes.rag_tasks.RagTask``."""
    header, chunks, question = task.segment_ids(tokenizer)
    return Layout(header, chunks, question)
