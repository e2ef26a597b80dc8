"""GPU benchmark (first part of issue 12): sparse decode over a compact evicted cache vs fp16
SDPA decode over the full cache; 32 q / 8 kv heads, d 128, fp16. Prints times, speed-ups and
the bandwidth reached on the bytes each reads.

    python benchmarks/gpu_decode.py [--lengths 8192,32768,131072] [--batches 1,8]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kernels.sparse_decode import sparse_decode_triton


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| batch | tokens | SDPA ms | SDPA TB/s | sparse 25% ms | speed-up | TB/s | sparse 10% ms | speed-up | TB/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in [int(x) for x in args.batches.split(",")]:
        for t in [int(x) for x in args.lengths.split(",")]:
            if b * t * 8 * 128 * 2 * 2 > 40 * 2**30:
                continue
            g = torch.Generator(device="cuda").manual_seed(t)
            q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.float16, generator=g)
            k = torch.randn(b, 8, t, 128, device="cuda", dtype=torch.float16, generator=g)
            v = torch.randn(b, 8, t, 128, device="cuda", dtype=torch.float16, generator=g)
            ms_sdpa = do_bench(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            )
            full_bytes = k.numel() * 2 * 2
            row = f"| {b} | {t} | {ms_sdpa:.3f} | {full_bytes / ms_sdpa / 1e9:.2f} |"
            for frac in (0.25, 0.10):
                kept = int(t * frac)
                kc, vc = k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous()
                lengths = torch.full((b, 8), kept, device="cuda", dtype=torch.int32)
                split = max(256, kept // 16)
                ms = do_bench(
                    lambda kc=kc, vc=vc, lengths=lengths, split=split, q=q: sparse_decode_triton(
                        q[:, :, 0], kc, vc, lengths, scale=128**-0.5, split_len=split
                    )
                )
                row += f" {ms:.3f} | {ms_sdpa / ms:.2f} | {kc.numel() * 2 * 2 / ms / 1e9:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
