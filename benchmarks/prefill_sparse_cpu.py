"""Prefill-side sparse attention on SmolLM2 (CPU): density, mass recall and output error of
XAttention (Xu et al. 2025), MInference-style vertical-slash (Jiang et al. 2024) and PSA
(pyramid pooled levels, Li et al. 2025) per method and threshold, on a niah prompt.

The prompt's real post-RoPE queries, keys and values are captured in one forward pass
(``probes.queries.capture_qkv``); every chosen layer's causal attention is then masked by each
config (``analysis.prefill_sparse``) and compared with full attention: means over layers and
query heads of the density (share of causal entries computed; pooled PSA blocks count 1/2**l),
the mean per-query recall of the true attention mass, the worst query's recall, and the
relative Frobenius error of each head's attention output (mean and worst head). With
``--answer`` the listed configs also run inside the model's prefill (``methods.sparse.prefill``)
and the table adds answer accuracy, mean KL and top-1 agreement against the full prefill.

    .venv/bin/python benchmarks/prefill_sparse_cpu.py [--tokens 1000] [--layers 0,3,...]
        [--block 64] [--stride 8] [--answer xattention:0.9,psa] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import polars as pl
import torch

from analysis.prefill_sparse import PSA, VerticalSlash, XAttention, layer_table, summary
from probes import load_model
from probes.capture import tokenize
from probes.queries import capture_qkv
from probes.tasks import make_task


def configs(block: int, stride: int) -> list:
    out: list = [XAttention(block=block, stride=stride, threshold=t) for t in (0.8, 0.9, 0.95)]
    out += [VerticalSlash(last_q=64, vertical=n, slash=n) for n in (32, 64, 128)]
    out += [
        PSA(block=block, stride=stride, thresholds=cuts)
        for cuts in ((0.7, 0.8, 0.9, 0.95), (0.8, 0.9, 0.95, 0.98))
    ]
    # the paper's cheap strided estimate instead of the exact probabilities' antidiagonals
    out += [
        XAttention(block=block, stride=stride, threshold=t, scoring="strided") for t in (0.9, 0.95)
    ]
    out.append(PSA(block=block, stride=stride, thresholds=(0.7, 0.8, 0.9, 0.95), scoring="strided"))
    # ... with the first key block (the attention sink) always kept
    out += [
        XAttention(block=block, stride=stride, threshold=0.9, scoring=sc, keep_sink=True)
        for sc in ("strided", "probs")
    ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", default="0,3,6,9,12,15,18,21,24,27")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument(
        "--answer",
        default="",
        help="comma-separated config indices (0-based, in table order) to also run inside "
        "the prefill for accuracy/KL; empty: none",
    )
    ap.add_argument("--new-tokens", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m", device="cpu")
    task = make_task("niah", args.tokens, tok, seed=args.seed)
    ids = tokenize(tok, task.prompt)
    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.perf_counter()
    qkv = capture_qkv(model, tok, ids, layers=layers)
    methods = configs(args.block, args.stride)
    table = layer_table(
        {layer: (qkv.queries[layer], qkv.keys[layer], qkv.values[layer]) for layer in layers},
        qkv.scale,
        methods,
        dtype=torch.float32,
    )
    s = summary(table)
    order = {m.label(): i for i, m in enumerate(methods)}
    s = s.with_columns(pl.col("config").replace_strict(order).alias("i")).sort("i")
    print(
        f"SmolLM2-135M niah, {len(ids)} tokens, layers {args.layers}, "
        f"{time.perf_counter() - t0:.1f} s for capture + masks"
    )
    print("\n| # | config | density | recall | min recall | output error | max output error |")
    print("|---|---|---|---|---|---|---|")
    for r in s.iter_rows(named=True):
        print(
            f"| {r['i']} | `{r['config']}` | {r['density']:.3f} | {r['recall']:.4f} | "
            f"{r['min_recall']:.3f} | {r['output_error']:.4f} | {r['max_output_error']:.3f} |"
        )
    if args.answer:
        from methods.sparse.prefill import prefill_compare

        chosen = [methods[int(i)] for i in args.answer.split(",")]
        t1 = time.perf_counter()
        full, runs = prefill_compare(
            model, tok, ids, chosen, max_new_tokens=args.new_tokens, score=task.score
        )
        print(
            f"\nInside the prefill (all 30 layers masked), {args.new_tokens} new tokens, "
            f"{time.perf_counter() - t1:.1f} s; full prefill: accuracy {full.accuracy}, "
            f"text {full.text!r}"
        )
        print("\n| config | accuracy | KL mean | KL first | top-1 | density | recall | text |")
        print("|---|---|---|---|---|---|---|---|")
        for run in runs:
            d = run.summary()
            print(
                f"| `{d['config']}` | {d['accuracy']} | {d['kl_mean']:.4f} | "
                f"{d['kl_first']:.4f} | {d['top1']:.2f} | {d['density']:.3f} | "
                f"{d['recall']:.4f} | {d['text']!r} |"
            )


if __name__ == "__main__":
    main()
