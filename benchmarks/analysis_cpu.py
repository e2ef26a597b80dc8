"""Time of every analysis module on a 2048-token SmolLM2 trace (CPU).

.venv/bin/python benchmarks/analysis_cpu.py [--tokens 2048]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from analysis import cross_layer, head_types, heavy_hitters, outliers
from probes import capture, load_model

TEXT = (Path(__file__).resolve().parents[1] / "README.md").read_text() * 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args()
    model, tok = load_model("smollm2-135m", device="cpu")
    ids = tok(TEXT)["input_ids"][: args.tokens]
    trace = capture(model, tok, ids, attention="stats", generate=8)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {trace.n_tokens} tokens")
    jobs = {
        "heavy hitters top-k": lambda: heavy_hitters.top_k(trace, 16),
        "heavy hitters model top": lambda: heavy_hitters.model_top(trace, 20),
        "head overlap": lambda: heavy_hitters.head_overlap(trace, 16),
        "layer overlap": lambda: heavy_hitters.layer_overlap(trace, 16),
        "sinks": lambda: heavy_hitters.sinks(trace),
        "persistence": lambda: heavy_hitters.persistence(trace, 16),
        "outlier channels": lambda: outliers.channel_stats(trace),
        "quantisation error": lambda: outliers.quantization_error(trace),
        "key similarity": lambda: cross_layer.pair_similarity(trace, "key"),
        "value similarity": lambda: cross_layer.pair_similarity(trace, "value"),
        "CKA": lambda: cross_layer.cka(trace, "key"),
        "SVD energy": lambda: cross_layer.svd_energy(trace, "key"),
        "head types": lambda: head_types.head_types(trace),
        "UMAP (first call, numba compile)": lambda: cross_layer.umap_keys(trace, 10, 0),
        "UMAP (second call)": lambda: cross_layer.umap_keys(trace, 20, 1),
    }
    total = 0.0
    print("| module | seconds |\n|---|---:|")
    for name, job in jobs.items():
        t0 = time.perf_counter()
        job()
        dt = time.perf_counter() - t0
        total += dt
        print(f"| {name} | {dt:.2f} |", flush=True)
    print(f"| all together | {total:.2f} |")


if __name__ == "__main__":
    main()
