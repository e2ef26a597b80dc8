"""GPU benchmark of issue 12: one decode step over the KV cache, 32 q / 8 kv heads, d 128, fp16.

fp16 SDPA over the full cache vs kvlens quantised decode (KIVI layout, int4 and int2, keys per
channel in groups of --group tokens, values per token, a full-precision residual of --residual
tokens) vs sparse decode over compact caches keeping 10% and 25% of the tokens. Each time is
the median of CUDA-graph replays (triton.testing.do_bench_cudagraph), so Python launch cost is
left out for every contender alike. Prints speed-ups over SDPA measured in this run and the
bandwidth reached on the bytes each actually reads, against this GPU's measured copy rate.

    python benchmarks/gpu_decode.py [--lengths 8192,32768,131072] [--batches 1,8] [--sweep]
        [--grid]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from kvlens_kernels.quant_decode import QuantKV, launch_defaults, quant_decode_triton
from kvlens_kernels.quantize import quantize_groups_triton
from kvlens_kernels.sparse_decode import sparse_decode_triton

HQ, HKV, D = 32, 8, 128


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted), the
    best of plain and CUDA-graph timing."""
    src = torch.empty(2**29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = min(do_bench(lambda: dst.copy_(src)), do_bench_cudagraph(lambda: dst.copy_(src)))
    return 2 * src.nbytes / ms / 1e-3


def quant_cache(k, v, bits, group, residual):
    b, h, t, d = k.shape
    n = (t - residual) // group * group
    blocks = quantize_groups_triton(
        k[:, :, :n].reshape(b * h, n, d), v[:, :, :n].reshape(b * h, n, d),
        key_bits=bits, value_bits=bits, group=group, key_per_channel=True,
    )  # fmt: skip
    rk, rv = k[:, :, n:].contiguous(), v[:, :, n:].contiguous()
    return QuantKV.from_blocks(
        blocks, rk, rv, key_bits=bits, value_bits=bits, group=group, key_per_channel=True
    )


def cache_bytes(cache: QuantKV) -> int:
    tensors = [getattr(cache, f) for f in cache.__dataclass_fields__]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument(
        "--sweep", action="store_true", help="launch settings around the defaults, at 128k"
    )
    parser.add_argument(
        "--grid", action="store_true", help="registers x waves over many rows, batch 4-16"
    )
    args = parser.parse_args()
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"copy bandwidth: {bw / 1e12:.2f} TB/s; times: median of CUDA-graph replays, us")
    cols = ["SDPA fp16", "int4", "int2", "sparse 25%", "sparse 10%"]
    print("| batch | tokens | " + " | ".join(f"{c} us | x | % copy" for c in cols) + " |")
    print("|---:|---:|" + "---:|---:|---:|" * len(cols))
    scale = D**-0.5
    for b in [int(x) for x in args.batches.split(",")]:
        for t in [int(x) for x in args.lengths.split(",")]:
            g = torch.Generator(device="cuda").manual_seed(t)
            q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16, generator=g)
            k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
            v = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
            runs = []  # (fn, bytes read)
            q4 = q[:, :, None]
            sdpa = partial(F.scaled_dot_product_attention, q4, k, v, enable_gqa=True)
            runs.append((sdpa, 2 * k.nbytes))
            for bits in (4, 2):
                c = quant_cache(k, v, bits, args.group, args.residual)
                runs.append((partial(quant_decode_triton, q, c, scale=scale), cache_bytes(c)))
            for frac in (0.25, 0.10):
                kept = int(t * frac)
                kc, vc = k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous()
                lengths = torch.full((b, HKV), kept, device="cuda", dtype=torch.int32)
                fn = partial(sparse_decode_triton, q, kc, vc, lengths, scale=scale, max_length=kept)
                runs.append((fn, 2 * kc.nbytes))
            times = [do_bench_cudagraph(fn) * 1e3 for fn, _ in runs]
            row = f"| {b} | {t} |"
            for (_, nbytes), us in zip(runs, times, strict=True):
                row += f" {us:.1f} | {times[0] / us:.2f} | {100 * nbytes / (us * 1e-6) / bw:.0f} |"
            print(row, flush=True)
            del runs
            torch.cuda.empty_cache()
    if args.sweep:
        sweep(scale, args.group, args.residual)
    if args.grid:
        launch_grid(scale, args.group, args.residual)


def quant_variants(bits: int, rows: int, tokens: int) -> list[dict]:
    """Launch settings around ``launch_defaults`` (which comes first): each setting changed
    alone, and the other regime's settings."""
    base = launch_defaults(bits, rows, tokens)
    other = launch_defaults(bits, 64 if rows < 32 else 8, tokens)
    changes = [
        {"overlap": not base["overlap"]},
        {"residual_split": not base["residual_split"]},
        {"waves": base["waves"] // 2},
        {"waves": base["waves"] * 3 // 2},
        {"maxnreg": 0 if base["maxnreg"] else 168},  # 0: no register cap
        {"block_n": 96 - base["block_n"]},  # 32 <-> 64
        {"num_warps": 3 - base["num_warps"], "res_stages": 3 - base["num_warps"]},  # 1 <-> 2
        {"num_stages": 2},
        {"num_stages": 4},
        other,
    ]
    return [base] + [base | c for c in changes]


def sweep(scale: float, group: int, residual: int) -> None:
    t = 131072
    for b in (1, 8):
        g = torch.Generator(device="cuda").manual_seed(b)
        q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16, generator=g)
        k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
        for bits in (4, 2):
            c = quant_cache(k, v, bits, group, residual)
            print(f"\nint{bits} at 128k, batch {b}: launch settings around the defaults (us)")
            for i, settings in enumerate(quant_variants(bits, b * HKV, c.n_quant)):
                fn = partial(quant_decode_triton, q, c, scale=scale, **settings)
                _report(("default " if i == 0 else "") + str(settings), fn)
            del c
        del k, v
        torch.cuda.empty_cache()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HQ, D, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(1, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(1, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
    print("\nsparse 10% at 128k, batch 1 (us)")
    kept = t // 10
    kc, vc = k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous()
    lengths = torch.full((1, HKV), kept, device="cuda", dtype=torch.int32)
    for block_n in (32, 64, 128):
        for split in (None, 512, 1024, 2048):
            if block_n == 32 and split:
                continue
            fn = partial(
                sparse_decode_triton, q, kc, vc, lengths, scale=scale, max_length=kept,
                block_n=block_n, split_len=split,
            )  # fmt: skip
            _report(f"sparse10% bn={block_n} split={split}", fn)
    del k, v, kc, vc
    torch.cuda.empty_cache()
    print("sparse 10% at batch 8, 32k and 128k: splits planned for 1, 2 or 4 waves (us)")
    for t in (32768, 131072):
        kept = t // 10
        q8 = torch.randn(8, HQ, D, device="cuda", dtype=torch.float16, generator=g)
        kc = torch.randn(8, HKV, kept, D, device="cuda", dtype=torch.float16, generator=g)
        vc = torch.randn_like(kc)
        lengths = torch.full((8, HKV), kept, device="cuda", dtype=torch.int32)
        for waves in (1, 2, 4):
            fn = partial(
                sparse_decode_triton, q8, kc, vc, lengths, scale=scale, max_length=kept,
                waves=waves,
            )  # fmt: skip
            _report(f"sparse10% T={t} B=8 waves={waves}", fn)


# (bits, batch, tokens) x register caps x waves: the grid behind launch_defaults' many-row rules
GRID = {
    2: ([(4, 16384), (4, 65536), (4, 131072), (8, 8192), (8, 32768), (8, 65536), (8, 131072),
         (16, 8192), (16, 32768)], (168, 184, 192), (8, 12, 16, 20, 24)),
    4: ([(4, 131072), (8, 32768), (8, 131072)], (128, 144, 160), (12, 16, 20)),
}  # fmt: skip


def launch_grid(scale: float, group: int, residual: int) -> None:
    """For many (batch x KV head) rows: every register cap x waves of splits around the
    defaults, the better of two timings each; prints the default and the three best."""
    print("\n| codes | batch | tokens | default us | best: registers, waves, us |")
    print("|---|---:|---:|---:|---|")
    for bits, (shapes, caps, waves_list) in GRID.items():
        for b, t in shapes:
            g = torch.Generator(device="cuda").manual_seed(b + t)
            q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16, generator=g)
            k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
            c = quant_cache(k, torch.randn_like(k), bits, group, residual)
            del k
            default = _best_of_two(partial(quant_decode_triton, q, c, scale=scale))
            times = []
            for cap in caps:
                for waves in waves_list:
                    fn = partial(quant_decode_triton, q, c, scale=scale, maxnreg=cap, waves=waves)
                    times.append((_best_of_two(fn), cap, waves))
            top = "; ".join(f"{cap}, {waves}, {us:.1f}" for us, cap, waves in sorted(times)[:3])
            print(f"| int{bits} | {b} | {t} | {default:.1f} | {top} |", flush=True)
            del c
            torch.cuda.empty_cache()


def _best_of_two(fn) -> float:
    """Microseconds: the better of two CUDA-graph medians."""
    return min(do_bench_cudagraph(fn) for _ in range(2)) * 1e3


def _report(label: str, fn) -> None:
    try:
        print(f"{label}: {do_bench_cudagraph(fn) * 1e3:.1f}", flush=True)
    except Exception as exc:  # a configuration that does not compile or run
        print(f"{label}: failed {exc!r:.80}", flush=True)


if __name__ == "__main__":
    main()
