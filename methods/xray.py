"""Compression X-ray: why a method's output drifted from the full cache.

For one method on one prompt: the full model's greedy continuation is the reference. The
method's compressed cache is teacher-forced along it while logging, per layer and KV head,
which positions it kept after prefill and which positions each later query attended over.
The full model is probed along the same tokens (``capture(..., forced=...)``), giving the
attention every head pays to every position at each step. From these:
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
from methods.evaluate import divergence, greedy, prefill_logits, teacher_forced
from methods.registry import create
from probes.capture import capture
from probes.errors import KvlensError


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


def xray(
    model, tokenizer, prompt_ids: list[int], spec: str, max_new_tokens: int = 16, top_heads: int = 5
) -> XRay:
    """X-ray of one method (spec string) on one prompt; see the module docstring."""
    method = create(spec)
    if method is None:
        raise KvlensError("the full cache has nothing to X-ray; give a method spec")
    if max_new_tokens < 2:
        raise KvlensError(f"max-new-tokens must be >= 2 for an X-ray, got {max_new_tokens}")
    n = len(prompt_ids)
    with torch.inference_mode():
        full_cache = DynamicCache()
        reference, ref_logits = greedy(
            model,
            prefill_logits(model, prompt_ids, full_cache, tokenizer),
            full_cache,
            max_new_tokens,
            set(),
        )
        own = CompressedCache(model, create(spec))
        generated, _ = greedy(
            model, prefill_logits(model, prompt_ids, own, tokenizer), own, max_new_tokens, set()
        )
        cache = CompressedCache(model, method)
        cache.record_xray()
        tf_logits = teacher_forced(
            model, prefill_logits(model, prompt_ids, cache, tokenizer), cache, reference
        )
    kls, _agree = divergence(ref_logits, tf_logits)
    # the full model's attention rows along the same tokens: step s is the query that produces
    # reference[s] (the prompt's last query at step 0), as the method's call s attends
    full = capture(model, tokenizer, prompt_ids, attention="stats", kv=False, forced=reference)
    group = full.model.n_heads // full.model.n_kv_heads
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
    dropped = _dropped_mass(full.step_stats, attended, group)
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


def _dropped_mass(step_stats: pl.DataFrame, attended: dict, group: int) -> pl.DataFrame:
    """Per step, layer and query head: the full model's attention on positions the method
    did not attend over."""
    rows = []
    for (step, layer, head), part in step_stats.partition_by(
        ["step", "layer", "head"], as_dict=True
    ).items():
        pos = attended.get((step, layer, head // group))
        if pos is None:
            continue
        att = torch.tensor(part.sort("position")["attention"].to_numpy())
        mask = torch.ones(att.numel(), dtype=torch.bool)
        mask[pos[pos < att.numel()]] = False
        rows.append(
            {
                "step": step,
                "layer": layer,
                "head": head,
                "kv_head": head // group,
                "dropped_mass": float(att[mask].sum()),
            }
        )
    return (
        pl.DataFrame(rows)
        .cast({"step": pl.Int32, "layer": pl.Int16, "head": pl.Int16, "kv_head": pl.Int16})
        .sort("step", "layer", "head")
    )
