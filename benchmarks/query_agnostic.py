"""Question unseen: every query-agnostic method compresses a context before its question, at
50%, 25% and 12.5% of the full cache's bytes (16-bit serving precision), on SmolLM2 (CPU).

Prompts: niah and multikey tasks (``probes.tasks.make_task``) at several lengths, seeds and
needle depths; each prompt is cut at its "Question:" into context and question. Per prompt,
the full cache answers once; then every method compresses the context alone through
``methods.ask.compress_context`` (the one prefill path: KVzip's replay runs there), its bytes
are read right after the compression, the question is appended and the answer decoded
greedily. Reported per method and target: needle accuracy, KL(full || method) of the first
answer token's distribution, bytes held vs the full 16-bit cache of the context.

Budgets: an eviction keeps ``budget`` tokens per KV head, each token costing 2*D*2 bytes of
keys and values plus a 4-byte position, so ``budget = floor(f * T * 2D*2 / (2D*2 + 4))``
holds at most the fraction ``f``; KVzip's ``ratio`` is the same fraction of pairs.
Quantisers have one setting each and stand in the tables whose target they meet. A
composition ``kvzip+kivi`` keeps ``ratio = margin * f / c`` of the pairs, ``c`` the quantiser's
bytes per token over a 16-bit token's (``kivi:bits=4,residual=0``: 80/256; 2 bits: 48/256),
the margin leaving room for each head's unquantised remainder (< one group); every figure in
the table is the measured one. Rows are appended to ``--out`` (JSON lines) as each prompt
finishes, and a rerun skips the prompts it holds.

    .venv/bin/python benchmarks/query_agnostic.py --lengths 500,1000,2000 --seeds 4
    python3 benchmarks/query_agnostic.py --device cuda --model PATH.gguf   # same run, a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from methods.ask import compress_context
from methods.cache import full_cache_nbytes
from methods.evaluate import prefill_logits, step_logits
from methods.registry import create
from probes import load_model
from probes.models import model_facts
from probes.tasks import context_and_question, make_task

EVICTIONS = (
    "knorm",
    "keydiff",
    "compactor",
    "compactor:sinks=4",
    "expected_attention",
    "kvzip",
    "streamingllm",
    "snapkv",
)
QUANTISERS = ("kivi:bits=4", "kivi:bits=2", "int8")  # each at its one setting
COMPOSED = {  # quantiser of the composition -> its bytes per token over a 16-bit token's
    "kivi:bits=4,group=32,residual=0": 80 / 256,
    "kivi:bits=2,group=32,residual=0": 48 / 256,
}
MARGIN = 0.85
DEPTHS = (0.2, 0.5, 0.8, 0.35, 0.65, 0.1)


def specs_for(target: float, n_tokens: int, head_dim: int) -> list[tuple[str, str]]:
    """(label, spec) of every method at ``target`` of the full cache's bytes."""
    token = 2 * head_dim * 2
    fraction = target * token / (token + 4)
    budget = max(8, math.floor(fraction * n_tokens))
    out = []
    for entry in EVICTIONS:  # "name" or "name:extra=params" (the label is the entry)
        name, _, extra = entry.partition(":")
        extra = f",{extra}" if extra else ""
        if name == "kvzip":
            out.append((entry, f"kvzip:ratio={fraction:.4f}{extra}"))
        else:
            out.append((entry, f"{name}:budget={budget}{extra}"))
    for quant, cost in COMPOSED.items():
        ratio = MARGIN * target / cost
        if ratio <= 1.0:
            label = "kvzip+" + quant.split(",")[0]
            out.append((label, f"kvzip:ratio={ratio:.4f}+{quant}"))
    return out


def prompts(lengths: list[int], seeds: int, tokenizer) -> list[dict]:
    out = []
    for seed in range(seeds):  # seed outermost: a partial run covers every kind and length
        for n in lengths:
            for kind in ("niah", "multikey"):
                depth = DEPTHS[seed % len(DEPTHS)]
                task = make_task(kind, n, tokenizer, depth=depth, seed=seed)
                context, question = context_and_question(task)
                out.append(
                    {
                        "id": f"{kind}-{n}-{seed}",
                        "kind": kind,
                        "length": n,
                        "seed": seed,
                        "depth": depth,
                        "context": context,
                        "question": question,
                        "answer": task.answers[0],
                    }
                )
    return out


def answer(model, cache, question_ids, tokenizer, n_new: int, eos: set[int]):
    """Greedy answer after ``question_ids``; returns (tokens, first logits)."""
    first = prefill_logits(model, question_ids, cache, tokenizer)
    tokens, logits = [], first
    for i in range(n_new):
        tok = int(logits.argmax())
        tokens.append(tok)
        if tok in eos or i == n_new - 1:
            break
        logits = step_logits(model, tok, cache)
    return tokens, first


def kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref_lp, got_lp = F.log_softmax(ref, -1), F.log_softmax(got, -1)
    return float((ref_lp.exp() * (ref_lp - got_lp)).sum())


def run_prompt(
    model, tokenizer, p: dict, targets: list[float], n_new: int, only: set[str] | None = None
) -> list[dict]:
    facts = model_facts(model)
    ctx = tokenizer(p["context"])["input_ids"]
    q = tokenizer(p["question"], add_special_tokens=False)["input_ids"]
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    full_bytes = full_cache_nbytes(model, len(ctx))
    rows = []

    def row(label, spec, target, tokens, first, nbytes, seconds):
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        return {
            "prompt": p["id"], "kind": p["kind"], "length": p["length"], "seed": p["seed"],
            "depth": p["depth"], "n_context": len(ctx), "label": label, "spec": spec,
            "target": target, "correct": p["answer"] in text, "text": text,
            "kl": kl(full_first, first), "bytes": nbytes, "bytes_ratio": nbytes / full_bytes,
            "time_s": seconds,
        }  # fmt: skip

    with torch.inference_mode():
        t0 = time.perf_counter()
        base = DynamicCache()
        prefill_logits(model, ctx, base)
        tokens, full_first = answer(model, base, q, tokenizer, n_new, eos)
        rows.append(
            row("full", "full", 1.0, tokens, full_first, full_bytes, time.perf_counter() - t0)
        )
        runs = [
            (t, label, spec)
            for t in targets
            for label, spec in specs_for(t, len(ctx), facts.head_dim)
        ]
        runs += [(None, spec, spec) for spec in QUANTISERS]
        if only:  # a supplementary pass: these labels alone (the full cache always runs)
            runs = [r for r in runs if r[1] in only]
        for target, label, spec in runs:
            t0 = time.perf_counter()
            cache = compress_context(model, ctx, spec, tokenizer)
            nbytes = cache.nbytes()
            tokens, first = answer(model, cache, q, tokenizer, n_new, eos)
            spec = create(spec).spec()
            rows.append(row(label, spec, target, tokens, first, nbytes, time.perf_counter() - t0))
    return rows


def table(rows: list[dict], targets: list[float]) -> str:
    """Markdown: per target, every method that meets it (quantisers by their measured bytes)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["label"], r["target"])].append(r)
    n_prompts = len({r["prompt"] for r in rows})
    lines = [
        f"{n_prompts} prompts; accuracy = right answers / prompts; KL of the first answer "
        "token vs the full cache (mean); bytes vs the full 16-bit cache of the context (mean, max)",
        "",
        "| target | method | accuracy | KL mean | bytes mean | bytes max |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    full = groups.get(("full", 1.0), [])
    if full:
        ok = sum(r["correct"] for r in full)
        lines.append(f"| 100% | full | {ok}/{len(full)} | 0 | 100% | 100% |")
    for target in targets:
        entries = []
        for (label, t), rs in groups.items():
            if label == "full":
                continue
            worst = max(r["bytes_ratio"] for r in rs)
            if t == target or (t is None and _tightest(worst, targets) == target):
                # a row whose largest cache exceeds its target says so
                over = worst > target + 5e-4  # beyond the table's rounding
                entries.append((f"{label} (over)" if over else label, rs))
        entries.sort(key=lambda e: -sum(r["correct"] for r in e[1]) / len(e[1]))
        for label, rs in entries:
            ok = sum(r["correct"] for r in rs)
            mean_kl = sum(r["kl"] for r in rs) / len(rs)
            mean_b = sum(r["bytes_ratio"] for r in rs) / len(rs)
            worst = max(r["bytes_ratio"] for r in rs)
            lines.append(
                f"| {target:.1%} | {label} | {ok}/{len(rs)} | {mean_kl:.3f} | {mean_b:.1%} | {worst:.1%} |"
            )
    return "\n".join(lines)


def _tightest(ratio: float, targets: list[float]) -> float | None:
    """The smallest target that ``ratio`` meets (a quantiser appears once, where it fits best);
    one within 2% above a target is shown there, marked as over it."""
    met = [t for t in targets if ratio <= t * 1.02]
    return min(met) if met else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="500,1000,2000")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--targets", default="0.5,0.25,0.125")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/query_agnostic.jsonl")
    parser.add_argument("--table-only", action="store_true", help="print the table of --out")
    parser.add_argument("--merge", nargs="*", default=[], help="more --out files for the table")
    parser.add_argument("--only", default="", help="labels separated by ; : run these alone")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th prompt from the i-th")
    parser.add_argument("--model", default="smollm2-135m", help="a model name, folder or .gguf")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the same run on a GPU")
    parser.add_argument("--dtype", default="float32", help="float32 (as on the CPU) or bfloat16")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    for extra in args.merge:  # other runs' files (shards, supplementary passes) in the table
        rows += [json.loads(line) for line in Path(extra).read_text().splitlines()]
    seen, unique = set(), []
    for r in rows:  # one row per prompt, label and target (every pass runs the full cache)
        key = (r["prompt"], r["label"], r["target"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    rows = unique
    lengths = [int(n) for n in args.lengths.split(",")]
    asked = {
        f"{k}-{n}-{s}" for k in ("niah", "multikey") for n in lengths for s in range(args.seeds)
    }
    rows = [r for r in rows if r["prompt"] in asked]  # the table covers the prompts asked for
    if not args.table_only:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        done = {r["prompt"] for r in rows}
        shard, n_shards = (int(x) for x in args.shard.split("/"))
        only = set(args.only.split(";")) if args.only else None
        for i, p in enumerate(prompts(lengths, args.seeds, tokenizer)):
            if p["id"] in done or i % n_shards != shard:
                continue
            t0 = time.perf_counter()
            new = run_prompt(model, tokenizer, p, targets, args.max_new_tokens, only)
            with out.open("a") as f:
                for r in new:
                    f.write(json.dumps(r) + "\n")
            rows += new
            right = sum(r["correct"] for r in new)
            print(
                f"{p['id']}: {right}/{len(new)} right, {time.perf_counter() - t0:.0f} s", flush=True
            )
    print(table(rows, targets))


if __name__ == "__main__":
    main()
