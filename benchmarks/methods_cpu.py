"""Every registered method at several budgets on the synthetic tasks, on SmolLM2 (CPU).

For each task (niah, multikey, vartrack) and seed, one `compare` call runs the full cache and
every method x budget on the same prompt; the script prints a markdown table of means over
tasks and seeds (KL, top-1 agreement, accuracy, bytes held vs full, time), then times one
live compare (full + SnapKV-128, 64 new tokens) on a 1k-token prompt.

    .venv/bin/python benchmarks/methods_cpu.py [--length 1024] [--budgets 64,128,256] [--seeds 2]
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--methods", default=",".join(available()))
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
