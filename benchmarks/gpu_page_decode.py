"""GPU benchmark of issue 24: one Quest-style page-sparse decode step against fp16 SDPA over the
whole cache, 32 q / 8 kv heads, d 128, at 32k and 128k tokens, batch 1 and 8.

The sparse step, end to end of the attention call: Quest's page bounds from the per-page key
minima and maxima (``kvlens_kernels.page_bounds``, Triton), ``torch.topk`` of the pages per KV head,
then attention over only those pages (``kvlens_kernels.page_decode``, Triton, the splits combined by
LSE). It reads 1/16 of the tokens (``--fraction``) plus the page summaries (2 / page of the
keys). The summaries are kept up to date as tokens arrive (one page's min/max per step), so
they are inputs here, as the cache is. SDPA is timed with its default backend and, where they
run, each forced backend. Times are medians of CUDA-graph replays (triton.testing
.do_bench_cudagraph: launch cost left out for every contender alike, as a server's captured
decode step runs); the eager column is the same step launched from Python. Bytes read are
counted from the tensors each contender reads; '% copy' is that over time against this GPU's
device-to-device copy rate measured here. Before timing, each configuration's output is
checked against the reference (gather the selected rows, exact attention).

    python benchmarks/gpu_page_decode.py [--lengths 32768,131072] [--batches 1,8]
        [--pages 16,64] [--fraction 0.0625] [--sweep]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

from kvlens_kernels.page_bounds import page_bounds_triton
from kvlens_kernels.page_decode import page_decode_reference, page_decode_triton

HQ, HKV, D = 32, 8, 128
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = min(do_bench(lambda: dst.copy_(src)), do_bench_cudagraph(lambda: dst.copy_(src)))
    return 2 * src.nbytes / ms / 1e-3


def sdpa_times(q4, k, v) -> tuple[float, dict[str, float]]:
    """Default-backend time (us) and each forced backend's that runs."""
    default = do_bench_cudagraph(partial(F.scaled_dot_product_attention, q4, k, v, enable_gqa=True))
    forced = {}
    for name, backend in BACKENDS.items():
        if name == "math":
            continue  # materialises the scores: not a contender
        try:
            with sdpa_kernel([backend]):
                fn = partial(F.scaled_dot_product_attention, q4, k, v, enable_gqa=True)
                fn()
                forced[name] = do_bench_cudagraph(fn) * 1e3
        except RuntimeError:
            forced[name] = float("nan")
    return default * 1e3, forced


def quest_step(q, k, v, kmin, kmax, lengths, counts, n_sel, page, scale, **launch):
    """Bounds -> top-k pages -> attention over those pages: one decode step's attention."""
    bounds = page_bounds_triton(q, kmin, kmax, pool="max")  # [B, Hkv, N_pages]
    pages = torch.topk(bounds, n_sel, dim=-1, sorted=False).indices
    return page_decode_triton(
        q, k, v, lengths, pages, counts, page_size=page, scale=scale, max_pages=n_sel, **launch
    )


def check(q, k, v, kmin, kmax, lengths, counts, n_sel, page, scale) -> None:
    """The step's output equals exact attention over the pages its bounds chose."""
    got = quest_step(q, k, v, kmin, kmax, lengths, counts, n_sel, page, scale).float()
    bounds = page_bounds_triton(q, kmin, kmax, pool="max")
    pages = torch.topk(bounds, n_sel, dim=-1, sorted=False).indices
    want = page_decode_reference(
        q, k, v, lengths, pages, counts, page_size=page, scale=scale
    ).float()
    err = (got - want).abs().max().item()
    assert err < 2e-2, f"page decode differs from its reference by {err}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--pages", default="16,64", help="page sizes (tokens)")
    parser.add_argument("--fraction", type=float, default=1 / 16, help="share of tokens read")
    parser.add_argument("--sweep", action="store_true", help="attention launch settings at 128k")
    args = parser.parse_args()
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s; times: median of CUDA-graph replays, us")
    print(
        f"sparse step: Quest bounds + top-k + page attention, reading {args.fraction:.4f} of tokens"
    )
    print(
        "| batch | tokens | page | SDPA default us | SDPA flash / efficient / cudnn us | "
        "bounds us | top-k us | attend us | step us | x SDPA | step eager x | MB read | "
        "% copy | SDPA % copy |"
    )
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    scale = D**-0.5
    for b in [int(x) for x in args.batches.split(",")]:
        for t in [int(x) for x in args.lengths.split(",")]:
            g = torch.Generator(device="cuda").manual_seed(t + b)
            q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16, generator=g)
            k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
            v = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
            q4 = q[:, :, None]
            sdpa_us, forced = sdpa_times(q4, k, v)
            sdpa_bytes = k.nbytes + v.nbytes
            lengths = torch.full((b, HKV), t, device="cuda", dtype=torch.int32)
            for page in [int(x) for x in args.pages.split(",")]:
                n_pages = t // page
                n_sel = max(1, round(n_pages * args.fraction))
                grouped = k.view(b, HKV, n_pages, page, D)
                kmin, kmax = grouped.amin(3).contiguous(), grouped.amax(3).contiguous()
                counts = torch.full((b, HKV), n_sel, device="cuda", dtype=torch.int32)
                step = partial(quest_step, q, k, v, kmin, kmax, lengths, counts, n_sel, page, scale)
                check(q, k, v, kmin, kmax, lengths, counts, n_sel, page, scale)
                bounds = page_bounds_triton(q, kmin, kmax)
                fixed = torch.topk(bounds, n_sel, dim=-1, sorted=False).indices
                parts = [
                    partial(page_bounds_triton, q, kmin, kmax),
                    partial(torch.topk, bounds, n_sel, dim=-1, sorted=False),
                    partial(
                        page_decode_triton, q, k, v, lengths, fixed, counts, page_size=page,
                        scale=scale, max_pages=n_sel,
                    ),
                ]  # fmt: skip
                part_us = [do_bench_cudagraph(fn) * 1e3 for fn in parts]
                step_us = do_bench_cudagraph(step) * 1e3
                eager_us = do_bench(step) * 1e3
                eager_sdpa = (
                    do_bench(partial(F.scaled_dot_product_attention, q4, k, v, enable_gqa=True))
                    * 1e3
                )
                read = kmin.nbytes + kmax.nbytes + 2 * bounds.nbytes  # summaries, bounds w + r
                read += 2 * b * HKV * n_sel * page * D * k.element_size()  # the pages' K and V
                backends = " / ".join(f"{forced[n]:.1f}" for n in ("flash", "efficient", "cudnn"))
                print(
                    f"| {b} | {t} | {page} | {sdpa_us:.1f} | {backends} | {part_us[0]:.1f} | "
                    f"{part_us[1]:.1f} | {part_us[2]:.1f} | {step_us:.1f} | "
                    f"{sdpa_us / step_us:.2f} | {eager_sdpa / eager_us:.2f} | {read / 2**20:.1f} | "
                    f"{100 * read / (step_us * 1e-6) / bw:.0f} | "
                    f"{100 * sdpa_bytes / (sdpa_us * 1e-6) / bw:.0f} |",
                    flush=True,
                )
            del k, v, q
            torch.cuda.empty_cache()
    print(
        "x SDPA: SDPA default time over the sparse step's, both CUDA-graph replays; step eager x: "
        "the same ratio, both launched from Python. MB read: summaries + bounds + selected pages."
    )
    if args.sweep:
        sweep(scale, args.fraction)


def sweep(scale: float, fraction: float) -> None:
    """Attention over fixed pages at 128k: block sizes and split waves around the defaults."""
    t, page = 131072, 16
    print("\n| batch | block_n | waves | attend us |")
    print("|---:|---:|---:|---:|")
    for b in (1, 8):
        g = torch.Generator(device="cuda").manual_seed(b)
        q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16, generator=g)
        k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
        lengths = torch.full((b, HKV), t, device="cuda", dtype=torch.int32)
        n_sel = round(t // page * fraction)
        pages = torch.stack(
            [torch.randperm(t // page, device="cuda", generator=g)[:n_sel] for _ in range(b * HKV)]
        ).view(b, HKV, n_sel)
        counts = torch.full((b, HKV), n_sel, device="cuda", dtype=torch.int32)
        for block_n in (32, 64, 128):
            for waves in (1, 2, 4):
                fn = partial(
                    page_decode_triton, q, k, v, lengths, pages, counts, page_size=page,
                    scale=scale, max_pages=n_sel, block_n=block_n, waves=waves,
                )  # fmt: skip
                print(
                    f"| {b} | {block_n} | {waves} | {do_bench_cudagraph(fn) * 1e3:.1f} |",
                    flush=True,
                )
        del k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
