"""Every registered method at several budgets on the synthetic tasks, on SmolLM2 (CPU).

For each task (niah, multikey, vartrack) and seed, one `compare` call runs the full cache and
every method x budget on the same prompt; the script prints a markdown table of means over
tasks and seeds (KL, top-1 agreement, accuracy, bytes held vs full, time), then times one
live compare (full + SnapKV-128, 64 new tokens) on a 1k-token prompt.

    .venv/bin/python benchmarks/methods_cpu.py [--length 1024] [--budgets 64,128,256] [--seeds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict

from methods.evaluate import compare
from methods.registry import available
from probes import load_model
from probes.tasks import TASK_KINDS, make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--budgets", default="64,128,256")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--methods",
        default=",".join(
            n
            for n, c in available().items()
            if c.family == "eviction" and "budget" in {f.name for f in dataclasses.fields(c)}
        ),
        help="eviction methods with a token budget (KVzip keeps a ratio: see benchmarks/query_agnostic.py)",
    )
    parser.add_argument(
        "--matched",
        action="store_true",
        help="instead: every family at about 25%% and 12.5%% of a 16-bit full cache's bytes",
    )
    parser.add_argument("--only", default="", help="with --matched: only these method names")
    args = parser.parse_args()
    if args.matched:
        matched_memory(args)
        return
    model, tok = load_model("smollm2-135m", device="cpu")
    budgets = [int(b) for b in args.budgets.split(",")]
    specs = ["full"] + [f"{m}:budget={b}" for m in args.methods.split(",") for b in budgets]
    rows: dict[tuple[str, str], list] = defaultdict(list)
    t_start = time.perf_counter()
    for kind in TASK_KINDS:
        for seed in range(args.seeds):
            task = make_task(kind, args.length, tok, seed=seed)
            ids = tok(task.prompt)["input_ids"]
            result = compare(
                model,
                tok,
                ids,
                specs,
                max_new_tokens=args.max_new_tokens,
                score=task.score,
                continuation=task.continuation,
            )
            for spec, r in zip(specs, result.results):
                rows[(spec, kind)].append(r)
            print(
                f"{kind} seed {seed}: {len(ids)} tokens, {time.perf_counter() - t_start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\n{args.length}-token tasks ({', '.join(TASK_KINDS)}), {args.seeds} seeds each, "
        f"{args.max_new_tokens} new tokens; means over tasks and seeds\n"
    )
    print(
        "| method | budget | KL mean | top-1 | "
        + " | ".join(f"acc {k}" for k in TASK_KINDS)
        + " | bytes vs full | time s |"
    )
    print("|---|---:|---:|---:|" + "---:|" * len(TASK_KINDS) + "---:|---:|")
    for spec in specs:
        name, _, budget = spec.partition(":budget=")
        everything = [r for k in TASK_KINDS for r in rows[(spec, k)]]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        accs = " | ".join(f"{mean([r.accuracy for r in rows[(spec, k)]]):.2f}" for k in TASK_KINDS)
        print(
            f"| {name} | {budget or '-'} | {mean([r.kl_mean for r in everything]):.3f} | "
            f"{mean([r.top1 for r in everything]):.2f} | {accs} | "
            f"{mean([r.bytes_ratio for r in everything]):.1%} | "
            f"{mean([r.time_s for r in everything]):.2f} |"
        )
    task = make_task("niah", 1000, tok, seed=5)
    ids = tok(task.prompt)["input_ids"]
    t0 = time.perf_counter()
    compare(model, tok, ids, "full,snapkv:budget=128", max_new_tokens=64)
    print(
        f"\nlive compare, full + snapkv:budget=128, {len(ids)}-token prompt, 64 new tokens: "
        f"{time.perf_counter() - t0:.1f} s"
    )


# Targets are fractions of a 16-bit full cache (methods.memory), measured at 1k tokens on
# SmolLM2 after one prefill of the niah prompt (low-rank ranks and Razor's windows picked to
# land within ~1 point): 2-bit codes with their scales and residual hold about 25%, so no
# quantiser alone reaches 12.5% (KVQuant-2, ~17%, is the nearest); 4- and 8-bit rows are
# listed above 25%.
MATCHED = {
    "above 25%": [
        "int8",
        "kivi:bits=4,residual=64",
        "kvquant:bits=4",
    ],
    "25%": [
        "snapkv:budget=256",
        "h2o:budget=256",
        "streamingllm:budget=256",
        "adakv:budget=256",
        "pyramidkv:budget=256",
        "d2o:budget=256",
        "kivi:bits=2,residual=64",
        "rotatekv:bits=2,residual=64",
        "gear:bits=2,rank=2",
        "zipcache:salient=0.2,high_bits=8,low_bits=2",
        "svd:rank=14",
        "xkv:rank=28,group=2",
        "razor:heads=0.1,recent=48",
    ],
    "12.5%": [
        "snapkv:budget=128",
        "h2o:budget=128",
        "streamingllm:budget=128",
        "adakv:budget=128",
        "pyramidkv:budget=128",
        "d2o:budget=128",
        "kvquant:bits=2",
        "svd:rank=7",
        "xkv:rank=14,group=2",
        "razor:heads=0.05,recent=32",
    ],
}


def matched_memory(args) -> None:
    model, tok = load_model("smollm2-135m", device="cpu")
    t_start = time.perf_counter()
    rows: dict[tuple[str, str], list] = defaultdict(list)
    tasks = ("niah", "multikey")
    only = [x for x in args.only.split(",") if x] if args.only else None
    for target, specs in MATCHED.items():
        if only:
            specs = [sp for sp in specs if sp.split(":")[0] in only]
        for kind in tasks:
            task = make_task(kind, args.length, tok, seed=0)
            ids = tok(task.prompt)["input_ids"]
            result = compare(
                model,
                tok,
                ids,
                ["full"] + specs,
                max_new_tokens=args.max_new_tokens,
                score=task.score,
                continuation=task.continuation,
            )
            for r in result.results[1:]:
                rows[(target, r.spec)].append(r)
            print(
                f"{target} {kind}: {time.perf_counter() - t_start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\n{args.length}-token niah and multikey (seed 0), {args.max_new_tokens} new tokens; "
        "bytes are measured, targets approximate\n"
    )
    print(
        "| target | method | family | bytes vs full | KL mean | top-1 | acc niah | acc multikey |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for (target, spec), rs in rows.items():
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        print(
            f"| {target} | {spec} | {rs[0].family} | {mean([r.bytes_ratio for r in rs]):.1%} | "
            f"{mean([r.kl_mean for r in rs]):.3f} | {mean([r.top1 for r in rs]):.2f} | "
            f"{rs[0].accuracy:.2f} | {rs[1].accuracy:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
