"""Latent attention readiness of an embedded model (TransMLA, Meng et al. 2025; issue 22).

Probes one generated niah prompt with K/V kept, then prints per tensor kind the energy a
latent of half the stacked width keeps (mean and worst layer) and the ranks for 90% / 99%:
pre-RoPE keys, values, keys and values jointly (balanced, the paper's PCA), and the cached
post-RoPE keys. Usage: ``python benchmarks/latent_readiness.py --length 1200``.
"""

from __future__ import annotations

import argparse

import polars as pl
import torch

from analysis import latent
from probes import capture, load_model
from probes.tasks import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=1200, help="prompt tokens (about)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small ops: one thread is faster on a shared CPU
    model, tok = load_model(args.model, device="cpu")
    ids = tok(make_task("niah", args.length, tok, seed=args.seed).prompt)["input_ids"]
    trace = capture(model, tok, ids, attention="stats", window=8, kv=True)
    post = latent.latent_summary(trace, keys="post_rope").filter(kind="key")
    table = pl.concat(
        [latent.latent_summary(trace), post.with_columns(kind=pl.lit("key (post-RoPE)"))]
    )
    print(f"{args.model}, niah prompt of {len(ids)} tokens (seed {args.seed})\n")
    print(
        "| kind | measured on | width | rank | energy kept, mean | worst layer | rank for 90%, mean | rank for 99%, mean / max |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (kind,), part in table.group_by("kind", maintain_order=True):
        worst = part.sort("energy_at_half").row(0, named=True)
        print(
            f"| {kind} | {part['source'][0]} | {part['width'][0]} | {part['half_rank'][0]} | "
            f"{part['energy_at_half'].mean():.4f} | {worst['energy_at_half']:.4f} (L{worst['layer']}) | "
            f"{part['rank_90'].mean():.1f} | {part['rank_99'].mean():.1f} / {part['rank_99'].max()} |"
        )


if __name__ == "__main__":
    main()
