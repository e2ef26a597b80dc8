"""GPU benchmark of issue 26's sweep goal: how many sweep examples a minute a GPU runs, with
``compare`` (the unit of work of ``kvlens sweep``: the full cache and every method of the grid
on one generated example, greedy and teacher-forced runs, perplexity on the held-out
continuation) decoding through the fast decoder (``methods.fast_runs``: each step one CUDA
graph replay, where the method allows) and through the eager per-token loop, in one run on one
loaded model. The two modes' greedy tokens are compared method by method (equal up to
near-ties of the logits: the two paths round differently in bf16).

Examples are the grid's tasks at each --lengths (tokens of context), seeds 0..--seeds-1;
"ex/min" counts examples (each = full + every method). Model loading is left out; the first,
short example of each mode warms the Triton kernels and is not counted.

    python benchmarks/gpu_sweep.py [--model smollm2-135m] [--lengths 1024,7900] [--seeds 2]
        [--grid benchmarks/sweep_default.toml] [--new 12] [--device cuda]

SmolLM2-135M holds 8192 positions: a 32k sweep needs a model with a 32k window, e.g. Gemma 3
270M (``--model gemma3-270m``): its full cache decodes on the fast path (rings on the sliding
layers), its compressed caches on the eager one (the "fast methods" column says how many of
the grid's methods the fast path took).
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from methods import fast_runs
from methods.cache import CompressedCache
from methods.evaluate import compare, prefill_logits
from methods.registry import create
from methods.sweep import load_grid
from probes import load_model
from probes.tasks import make_task


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def fast_methods(model, tokenizer, specs: list[str]) -> list[str]:
    """The specs whose caches the fast decoder takes on this model (checked on a short prompt)."""
    ids = tokenizer("The fast decoder takes this cache or it does not.")["input_ids"]
    out = []
    with torch.inference_mode():
        for spec in specs:
            cache = CompressedCache(model, create(spec))
            prefill_logits(model, ids, cache, tokenizer)
            if fast_runs.applies(model, cache):
                out.append(spec)
    return out


def run_mode(model, tokenizer, examples, specs, new: int, fast: bool):
    """Seconds for every example, and each example's results."""
    t0 = _now()
    results = []
    for task in examples:
        ids = tokenizer(task.prompt)["input_ids"]
        results.append(
            compare(
                model, tokenizer, ids, ["full", *specs], max_new_tokens=new, score=task.score,
                continuation=task.continuation, fast_decode=fast,
            ).results
        )  # fmt: skip
    return _now() - t0, results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="1024,7900")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--grid", default="benchmarks/sweep_default.toml")
    parser.add_argument("--new", type=int, default=12)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script")
    args = parser.parse_args()
    grid = load_grid(args.grid)
    specs = [m for m in grid.methods if m != "full"]
    model, tokenizer = load_model(args.model, device=args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"device: {name}, torch {torch.__version__}, {args.model}")
    fast = fast_methods(model, tokenizer, specs)
    print(f"methods ({len(specs)}): {', '.join(specs)}; fast path takes {len(fast)}: {fast}")
    full_fast = fast_runs.applies(model, DynamicCache())
    print(f"full cache on the fast path: {'yes' if full_fast else 'no'}")
    warm = [make_task(grid.tasks[0], 256, tokenizer, seed=0)]
    for mode in (False, True):
        run_mode(model, tokenizer, warm, specs, args.new, mode)
    print("| length | examples | fast methods | eager s | fast s | eager ex/min | fast ex/min "
          "| speed-up | same tokens |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for length in [int(n) for n in args.lengths.split(",")]:
        examples = [
            make_task(task, length, tokenizer, seed=seed)
            for task in grid.tasks
            for seed in range(args.seeds)
        ]
        t_eager, eager = run_mode(model, tokenizer, examples, specs, args.new, False)
        t_fast, quick = run_mode(model, tokenizer, examples, specs, args.new, True)
        pairs = [(a, b) for x, y in zip(eager, quick, strict=True) for a, b in zip(x, y)]
        same = sum(a.token_ids == b.token_ids for a, b in pairs)
        n = len(examples)
        print(
            f"| {length} | {n} | {len(fast)}/{len(specs)} | {t_eager:.1f} | {t_fast:.1f} | "
            f"{60 * n / t_eager:.1f} | {60 * n / t_fast:.1f} | {t_eager / t_fast:.2f} | "
            f"{same}/{len(pairs)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
