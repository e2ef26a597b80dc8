"""Sweep block sizes of the one-pass statistics kernel at one length (32q/8kv, d128, bf16).

python benchmarks/gpu_stats_blocks.py [--tokens 32768]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kvlens_kernels.attention_stats_triton import _sdpa_with_lse, attention_stats_fast

CONFIGS = [  # (BLOCK_M queries, BLOCK_N keys, warps, stages)
    (64, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 64, 4, 2),
    (64, 32, 4, 3),
    (32, 64, 4, 3),
    (64, 64, 8, 3),
    (128, 64, 8, 3),
    (64, 128, 8, 3),
    (128, 64, 4, 3),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    args = parser.parse_args()
    t, hq, hkv, d = args.tokens, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(hq, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
    sdpa = do_bench(
        lambda: F.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, enable_gqa=True
        )
    )
    lse_only = do_bench(lambda: _sdpa_with_lse(q, k, v, d**-0.5))
    print(
        f"{t} tokens: SDPA default {sdpa:.3f} ms; SDPA with LSE (cuDNN op + GQA repeat) {lse_only:.3f} ms"
    )
    for cfg in CONFIGS:
        try:
            ms = do_bench(lambda cfg=cfg: attention_stats_fast(q, k, v, scale=d**-0.5, blocks=cfg))
            print(
                f"blocks {cfg}: {ms:.3f} ms total, stats pass ~{ms - lse_only:.3f} ms, {ms / sdpa:.2f}x SDPA"
            )
        except Exception as exc:  # a config that does not fit shared memory
            print(f"blocks {cfg}: failed ({exc.__class__.__name__})")


if __name__ == "__main__":
    main()
