"""GPU benchmark: attention with exact statistics (Triton) vs SDPA vs eager, one layer.

32 query / 8 KV heads, head_dim 128, bf16, causal prefill, at 4k-128k tokens. Prints, from
one run: SDPA time for the default backend and for the flash and cuDNN backends where they
run, kvlens statistics time (forward + column-sum kernels), eager time with probabilities
(where it fits), ratios, and peak extra memory of each.

    python benchmarks/gpu_attention_stats.py [--lengths 4096,8192,...]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from kvlens_kernels.attention_stats_triton import attention_stats_fast, attention_stats_triton


def peak_extra(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    args = parser.parse_args()
    hq, hkv, d = 32, 8, 128
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        "| tokens | SDPA default ms | SDPA flash ms | SDPA cuDNN ms | kvlens stats ms (SDPA LSE + 1 pass) | two Triton passes ms | stats / default | "
        "stats / flash | eager ms | eager / default | stats extra MiB | SDPA extra MiB | eager extra MiB |"
    )
    print("|---:" * 13 + "|")
    for t in [int(x) for x in args.lengths.split(",")]:
        bench_length(t, hq, hkv, d)
        torch.cuda.empty_cache()


def bench_length(t: int, hq: int, hkv: int, d: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(1, hq, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, hkv, t, d, device="cuda", dtype=torch.bfloat16, generator=g)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def backend(b):
        def run():
            with sdpa_kernel(b):
                return sdpa()

        try:
            return do_bench(run, warmup=5, rep=30)
        except RuntimeError:
            return float("nan")

    def stats():
        return attention_stats_fast(q[0], k[0], v[0], scale=d**-0.5)

    def stats_two_pass():
        return attention_stats_triton(q[0], k[0], v[0], scale=d**-0.5)

    def eager():
        kk = k.repeat_interleave(hq // hkv, 1)
        vv = v.repeat_interleave(hq // hkv, 1)
        s = (q @ kk.transpose(-1, -2)) * d**-0.5
        s = s.masked_fill(torch.ones(t, t, device="cuda", dtype=torch.bool).triu(1), float("-inf"))
        p = s.softmax(-1)
        return p @ vv, p

    t_default = do_bench(sdpa, warmup=5, rep=30)
    t_flash = backend(SDPBackend.FLASH_ATTENTION)
    t_cudnn = backend(SDPBackend.CUDNN_ATTENTION)
    t_stats = do_bench(stats, warmup=3, rep=20)
    t_two = do_bench(stats_two_pass, warmup=3, rep=20)
    m_stats = peak_extra(stats)
    m_sdpa = peak_extra(sdpa)
    free = torch.cuda.mem_get_info()[0]
    eager_bytes = 2.5 * hq * t * t * 4
    if eager_bytes < 0.8 * free:
        t_eager = do_bench(eager, warmup=1, rep=5)
        m_eager = peak_extra(eager)
        eager_txt = f"{t_eager:.2f} | {t_eager / t_default:.1f} |"
        m_eager_txt = f"{m_eager:.0f}"
    else:
        eager_txt = "out of memory | - |"
        m_eager_txt = f"~{eager_bytes / 2**20:.0f} needed"
    print(
        f"| {t} | {t_default:.3f} | {t_flash:.3f} | {t_cudnn:.3f} | {t_stats:.3f} | {t_two:.3f} | {t_stats / t_default:.2f} | "
        f"{t_stats / t_flash:.2f} | {eager_txt} {m_stats:.0f} | {m_sdpa:.0f} | {m_eager_txt} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
