"""Compression X-ray: why a method's output drifted from the full cache.

For one method on one prompt: the full model's greedy continuation is the reference. The
method's compressed cache is teacher-forced along it while logging, per layer and KV head,
which positions it kept after prefill and which positions each later query attended over.
The full model's attention every head pays to every position at each step is recorded on
that same greedy run (``full_run``; one run serves every method X-rayed on the prompt), and
the method's own greedy tokens share the teacher-forced run's steps until they differ
(``methods.evaluate.replay``). From these:
  kept / evicted  per layer, KV head and step;
  dropped mass    per step, layer and query head: the full model's attention on positions the
                  method no longer held at that step (0 at the prefill step: the prompt's own
                  queries attend before eviction);
  per-step KL     of next-token distributions, full vs method (teacher forced);
  divergence      the first generated token where the method's free-running output differs,
                  and the heads whose dropped mass was largest at the step that predicted it.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch
from transformers import DynamicCache

from methods.cache import CompressedCache
from methods.evaluate import divergence, prefill_logits, replay, step_logits
from methods.registry import create
from probes.attention import Recorder, recording
from probes.errors import KvlensError
from probes.models import model_facts


@dataclass
class XRay:
    spec: str
    n_prompt: int
    reference: list[int]  # the full cache's greedy tokens
    generated: list[int]  # the method's own greedy tokens
    kl_per_step: list[float]
    kept: pl.DataFrame  # layer, kv_head, step, n_kept, positions
    dropped: pl.DataFrame  # step, layer, head, kv_head, dropped_mass
    first_divergence: int | None
    culprit_heads: pl.DataFrame  # layer, head, dropped_mass at the divergence step

    def to_json(self) -> dict:
        return {
            "spec": self.spec,
            "n_prompt": self.n_prompt,
            "reference": self.reference,
            "generated": self.generated,
            "kl_per_step": self.kl_per_step,
            "first_divergence": self.first_divergence,
            "culprit_heads": self.culprit_heads.to_dicts(),
            "kept": self.kept.drop("positions").to_dicts(),
            "dropped_by_step": self.dropped.group_by("step")
            .agg(pl.col("dropped_mass").mean())
            .sort("step")
            .to_dicts(),
        }


@dataclass
class FullRun:
    """The full model's side of an X-ray, shared by every method X-rayed on one prompt: its
    greedy tokens, the logits that chose them, and per (step, layer) the attention row
    [heads, positions] of the query that produces ``reference[step]``."""

    prompt_ids: list[int]
    reference: list[int]
    logits: list[torch.Tensor]
    rows: dict[tuple[int, int], torch.Tensor]


def full_run(model, prompt_ids: list[int], max_new_tokens: int) -> FullRun:
    """The full cache's greedy run, recording each step's attention rows on the way.

    One pass: the recorder keeps only the rows and leaves the output to the unrecorded path,
    so the tokens and logits are those of ``greedy`` without a probe; the rows are the full
    model's attention along those tokens (what ``capture(..., forced=reference)`` records,
    to float32 rounding: that probe computes its outputs through the statistics kernel)."""
    if max_new_tokens < 2:
        raise KvlensError(f"max-new-tokens must be >= 2 for an X-ray, got {max_new_tokens}")
    rec = Recorder(kv=False, stats=False, rows_only=True, steps=True)
    tokens, logits = [], []
    with torch.inference_mode(), recording(rec):
        cache = DynamicCache()
        logits.append(prefill_logits(model, prompt_ids, cache))
        rec.phase = "decode"
        for i in range(max_new_tokens):  # greedy's loop, with the step number for the rows
            tokens.append(int(logits[-1].argmax()))
            if i == max_new_tokens - 1:
                break
            rec.step = i + 1
            logits.append(step_logits(model, tokens[-1], cache))
    rows = {(step, layer): row for step, layer, row in rec.step_rows}
    return FullRun(list(prompt_ids), tokens, logits, rows)


def xray(
    model,
    tokenizer,
    prompt_ids: list[int],
    spec: str,
    max_new_tokens: int = 16,
    top_heads: int = 5,
    full: FullRun | None = None,
) -> XRay:
    """X-ray of one method (spec string) on one prompt; see the module docstring.

    ``full``: the full model's run from ``full_run`` on the same prompt and length, to reuse
    across methods (computed here when not given)."""
    method = create(spec)
    if method is None:
        raise KvlensError("the full cache has nothing to X-ray; give a method spec")
    if max_new_tokens < 2:
        raise KvlensError(f"max-new-tokens must be >= 2 for an X-ray, got {max_new_tokens}")
    n = len(prompt_ids)
    if full is None:
        full = full_run(model, prompt_ids, max_new_tokens)
    elif full.prompt_ids != list(prompt_ids) or len(full.reference) != max_new_tokens:
        raise KvlensError("the full model's run is of another prompt or length; recompute it")
    reference = full.reference
    with torch.inference_mode():
        cache = CompressedCache(model, method)
        cache.record_xray()
        first = prefill_logits(model, prompt_ids, cache, tokenizer)
        # teacher-forced along the reference (logged), and the method's own greedy tokens
        tf_logits, generated, _, _ = replay(model, first, cache, reference, max_new_tokens, set())
    kls, _agree = divergence(full.logits, tf_logits)
    facts = model_facts(model)
    group = facts.n_heads // facts.n_kv_heads
    kept_rows, attended = [], {}
    for layer_idx, layer in enumerate(cache.layers):
        for call, (_seen, _tq, seen_positions, kept_positions) in enumerate(layer.history):
            step = 0 if call == 0 else call
            for h, pos in enumerate(kept_positions if call == 0 else seen_positions):
                kept_rows.append(
                    {
                        "layer": layer_idx,
                        "kv_head": h,
                        "step": step,
                        "n_kept": int(pos.numel()),
                        "positions": pos.tolist(),
                    }
                )
                if call > 0:
                    attended[(step, layer_idx, h)] = pos
    kept = pl.DataFrame(kept_rows).cast({"layer": pl.Int16, "kv_head": pl.Int16, "step": pl.Int32})
    dropped = _dropped_mass(full.rows, attended, group)
    first = next((i for i, (a, b) in enumerate(zip(reference, generated)) if a != b), None)
    culprits = pl.DataFrame(
        schema={"layer": pl.Int16, "head": pl.Int16, "dropped_mass": pl.Float64}
    )
    if first is not None and first > 0:
        culprits = (
            dropped.filter(step=first)
            .sort("dropped_mass", descending=True)
            .head(top_heads)
            .select("layer", "head", "dropped_mass")
        )
    return XRay(
        spec=method.spec(),
        n_prompt=n,
        reference=reference,
        generated=generated,
        kl_per_step=kls,
        kept=kept,
        dropped=dropped,
        first_divergence=first,
        culprit_heads=culprits,
    )


def _dropped_mass(rows: dict, attended: dict, group: int) -> pl.DataFrame:
    """Per step, layer and query head: the full model's attention on positions the method
    did not attend over."""
    cols = {"step": [], "layer": [], "head": [], "kv_head": [], "dropped_mass": []}
    for step, layer in sorted(rows):
        att = rows[(step, layer)]  # [heads, positions]
        for kv_head in range(att.shape[0] // group):
            pos = attended.get((step, layer, kv_head))
            if pos is None:
                continue
            mask = torch.ones(att.shape[1], dtype=torch.bool)
            mask[pos[pos < att.shape[1]]] = False
            for head in range(kv_head * group, (kv_head + 1) * group):
                cols["step"].append(step)
                cols["layer"].append(layer)
                cols["head"].append(head)
                cols["kv_head"].append(kv_head)
                cols["dropped_mass"].append(float(att[head][mask].sum()))
    return (
        pl.DataFrame(cols)
        .cast({"step": pl.Int32, "layer": pl.Int16, "head": pl.Int16, "kv_head": pl.Int16})
        .sort("step", "layer", "head")
    )
