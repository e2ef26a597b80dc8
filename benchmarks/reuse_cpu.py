"""Chunk-cache reuse on SmolLM2 (CPU): accuracy and KL against the recomputed fraction for every
method (CacheBlend, Yao et al. 2025; Cache-Craft, Agarwal et al. 2025; KVCOMM, Ye et al. 2025).

For each task kind (rag: the answer in one chunk; twohop: it needs two) and seed, one
``reuse_compare`` call runs the full prefill, naive reuse, CacheBlend and Cache-Craft at each
recompute fraction and KVCOMM on the same prompt; the script prints a markdown table of means
over seeds per kind and method: recomputed share of chunk tokens, prefill FLOPs saved,
teacher-forced KL(full || method), top-1 agreement, answer accuracy, and the reused values'
relative deviation from the full prefill (mean over layers and chunk tokens).

    .venv/bin/python benchmarks/reuse_cpu.py [--chunks 6] [--chunk-tokens 128] [--seeds 3]
        [--recompute 0.05,0.15,0.3,0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import polars as pl
import torch

from analysis.chunk_reuse import kv_deviation
from methods.reuse.run import reuse_compare, task_layout
from probes import load_model
from probes.rag_tasks import RAG_KINDS, make_rag_task


def specs_for(fractions: list[float], anchors: int) -> list[str]:
    """full, naive, CacheBlend and Cache-Craft at each fraction, KVCOMM."""
    out = ["full", "naive"]
    out += [f"cacheblend:recompute={r}" for r in fractions]
    out += [f"cachecraft:recompute={r}" for r in fractions]
    return out + [f"kvcomm:anchors={anchors}"]


def value_deviation(run, segments: list[int]) -> dict[str, float]:
    """Per spec: mean relative value deviation from the full prefill over chunk tokens."""
    full = run.tensors["full"]
    out = {"full": 0.0}
    for spec, t in run.tensors.items():
        if spec != "full":
            kv = kv_deviation(full["keys"], full["values"], t["keys"], t["values"], segments)
            out[spec] = float(kv.filter(pl.col("segment") >= 0)["value_rel"].mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recompute", default="0.05,0.15,0.3,0.5")
    parser.add_argument("--anchors", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--kinds", default=",".join(RAG_KINDS))
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fractions = [float(r) for r in args.recompute.split(",")]
    specs = specs_for(fractions, args.anchors)
    model, tok = load_model("smollm2-135m", device="cpu")
    rows: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    n_prompt: list[int] = []
    t_start = time.perf_counter()
    for kind in args.kinds.split(","):
        for seed in range(args.seeds):
            task = make_rag_task(
                kind, tok, n_chunks=args.chunks, chunk_tokens=args.chunk_tokens, seed=seed
            )
            layout = task_layout(task, tok)
            run = reuse_compare(
                model, tok, layout, specs, max_new_tokens=args.max_new_tokens,
                score=task.score, keep_tensors=True,
            )  # fmt: skip
            dev = value_deviation(run, layout.segments())
            n_prompt.append(run.settings["n_prompt_tokens"])
            for spec, r in zip(specs, run.results):
                rows[(kind, spec)].append(
                    (r.recomputed, r.flops_saved, r.kl_mean, r.top1, r.accuracy, dev[r.spec],
                     r.time_s)
                )  # fmt: skip
    elapsed = time.perf_counter() - t_start
    print(
        f"SmolLM2-135M, CPU ({args.threads} thread), {args.chunks} chunks x ~{args.chunk_tokens} "
        f"tokens ({min(n_prompt)}-{max(n_prompt)} prompt tokens), {args.seeds} seeds per kind, "
        f"{args.max_new_tokens} new tokens; {elapsed:.0f} s in all\n"
    )
    print(
        "| task | method | recomputed | FLOPs saved | KL mean | top-1 | accuracy "
        "| value dev | time s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (kind, spec), vals in rows.items():
        mean = [sum(v[i] for v in vals) / len(vals) for i in range(7)]
        print(
            f"| {kind} | {spec} | {mean[0]:.1%} | {mean[1]:.1%} | {mean[2]:.4f} | "
            f"{mean[3]:.2f} | {mean[4]:.2f} | {mean[5]:.3f} | {mean[6]:.1f} |"
        )


if __name__ == "__main__":
    main()
