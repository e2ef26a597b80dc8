"""Run sparse-attention methods against the full cache on one prompt, and measure them.

The full cache's greedy continuation is the reference. Each method's compressed cache is
teacher-forced along it (per-step KL and top-1 agreement against the full cache) while its
own greedy tokens share those steps until they differ (``methods.evaluate.replay``). The
teacher-forced run logs, per layer, KV head and step, the queries and the rows read; the
attention recall of every step (``analysis.sparse_recall``) is computed against the exact
attention over every row the store holds at that step. Also: bytes held on the device and
on the host and read per step (``CompressedCache.memory``), and which positions each step
read (the X-ray strip).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import torch
from transformers import DynamicCache

from analysis.sparse_recall import SelectedStep, recall_table
from methods.cache import CompressedCache, full_cache_nbytes
from methods.evaluate import divergence, greedy, prefill_logits, replay
from methods.registry import create, split_specs
from probes.errors import KvlensError


@dataclass
class SparseRun:
    spec: str
    text: str
    tokens: list[int]
    kl_per_step: list[float]
    top1: float
    accuracy: float | None
    memory: dict
    full_bytes: int
    recall: pl.DataFrame  # analysis.sparse_recall.SCHEMA
    reads: pl.DataFrame  # layer, kv_head, step, n_held, positions (those read)
    full_text: str = ""  # the full cache's greedy text (the reference)
    full_accuracy: float | None = None

    def summary(self) -> dict:
        return {
            "spec": self.spec,
            "text": self.text,
            "accuracy": self.accuracy,
            "kl_mean": sum(self.kl_per_step) / len(self.kl_per_step),
            "top1": self.top1,
            "recall": float(self.recall["recall"].mean()),
            "oracle_recall": float(self.recall["oracle_recall"].mean()),
            "output_error": float(self.recall["output_error"].mean()),
            "tokens_read": float(self.recall["n_read"].mean()),
            "full_bytes": self.full_bytes,
            **{f"bytes_{k}": v for k, v in self.memory.items()},
        }


def _logged(
    cache: CompressedCache, spec: str, n_prompt: int
) -> tuple[list[SelectedStep], pl.DataFrame]:
    """The run's logged steps (step s: the query that produces the s-th new token, seeing
    n_prompt + s tokens), and the positions each read."""
    steps, reads = [], {"layer": [], "kv_head": [], "step": [], "n_held": [], "positions": []}
    for layer_idx, layer in enumerate(cache.layers):
        if not layer.selections:
            continue
        store = layer.store
        keys, values = store.keys, store.values  # every row held (rebuilt where encoded)
        positions = [p.to(torch.int64).cpu() for p in store.positions]
        for seen, q, rows, lengths in layer.selections:
            call = seen - n_prompt
            group = q.shape[0] // len(rows)
            for h, r in enumerate(rows):
                n = lengths[h]
                steps.append(
                    SelectedStep(
                        method=spec, layer=layer_idx, kv_head=h, step=call,
                        first_head=h * group, query=q[h * group : (h + 1) * group],
                        keys=keys[h][:n].cpu(), values=values[h][:n].cpu(), rows=r,
                        scale=layer.scale,
                    )
                )  # fmt: skip
                reads["layer"].append(layer_idx)
                reads["kv_head"].append(h)
                reads["step"].append(call)
                reads["n_held"].append(n)
                reads["positions"].append(positions[h][r].tolist())
    frame = pl.DataFrame(reads).cast({"layer": pl.Int16, "kv_head": pl.Int16, "step": pl.Int32})
    return steps, frame


def sparse_compare(
    model,
    tokenizer,
    prompt_ids: list[int],
    specs: list[str] | str,
    *,
    max_new_tokens: int = 8,
    score: Callable[[str], float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[SparseRun]:
    """One ``SparseRun`` per sparse method spec (``full`` is the reference, not a run)."""
    if isinstance(specs, str):
        specs = split_specs(specs)
    methods = []
    for spec in specs:
        method = create(spec)
        if method is None:
            continue
        if not method.selects:
            raise KvlensError(
                f"{method.name} is not a sparse method (family {method.family}); the sparse "
                "family keeps the cache and selects what each step reads"
            )
        methods.append(method)
    if not methods:
        raise KvlensError("give at least one sparse method, e.g. quest:budget=256")
    if max_new_tokens < 2:
        raise KvlensError(f"max-new-tokens must be >= 2 (a decoding step), got {max_new_tokens}")
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    runs = []
    with torch.inference_mode():
        if progress:
            progress("full")
        full = DynamicCache()
        first = prefill_logits(model, prompt_ids, full, tokenizer)
        reference, ref_logits = greedy(model, first, full, max_new_tokens, eos)
        full_bytes = full_cache_nbytes(model, len(prompt_ids) + len(reference) - 1)
        full_text = tokenizer.decode(reference, skip_special_tokens=True)
        for method in methods:
            spec = method.spec()
            if progress:
                progress(spec)
            cache = CompressedCache(model, method)
            for layer in cache.layers:
                layer.record_history = True
            own_first = prefill_logits(model, prompt_ids, cache, tokenizer)
            tf_logits, tokens, _, _ = replay(
                model, own_first, cache, reference, max_new_tokens, eos
            )
            kls, agree = divergence(ref_logits, tf_logits)
            steps, reads = _logged(cache, spec, len(prompt_ids))
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            runs.append(
                SparseRun(
                    spec=spec,
                    text=text,
                    tokens=tokens,
                    kl_per_step=kls,
                    top1=sum(agree) / len(agree),
                    accuracy=score(text) if score else None,
                    memory=cache.memory(),
                    full_bytes=full_bytes,
                    recall=recall_table(steps),
                    reads=reads,
                    full_text=full_text,
                    full_accuracy=score(full_text) if score else None,
                )
            )
    return runs
