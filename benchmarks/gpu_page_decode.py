"""GPU benchmark of issue 24: one Quest-style page-sparse decode step (Tang et al. 2024, "Quest:
Query-Aware Sparsity for Efficient Long-Context LLM Inference") against fp16 SDPA over the
whole cache, 32 q / 8 kv heads, d 128, at 32k and 128k tokens, batch 1 and 8.

The sparse step, end to end of the attention call: Quest's page bounds from the per-page key
minima and maxima (``kvlens_kernels.page_bounds``, Triton), the top pages per KV head, then
attention over only those pages (``kvlens_kernels.page_decode``, Triton, the splits combined by
LSE). The top pages are chosen two ways, each timed alone and inside a whole step:
``torch.topk`` (unsorted) and the Triton selection ``kvlens_kernels.page_select`` (a search for
the k-th bound over the row in registers, then a compaction). A third contender is the same
step in two launches (``kvlens_kernels.page_step``: the bounds kernel, then one launch per
(batch, KV head, split) that chooses the pages as ``page_select`` does, attends over its split of
their rows, and whose last program per head combines the splits): columns "fused us" and its
"x SDPA". It reads 1/16 of the tokens
(``--fraction``) plus the page summaries (2 / page of the keys). The summaries are kept up to
date as tokens arrive (one page's min/max per step), so they are inputs here, as the cache is.
SDPA is timed with its default backend and, where they run, each forced backend.

Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph, return_mode
median: launch cost left out for every contender alike, as a server's captured decode step
runs); the eager column is the same step launched from Python. ``--sets N`` rotates every
contender over N independent input sets (q, K, V and summaries), so a step at batch 1, whose
~40 MB would otherwise stay in the 50 MB L2 between replays, reads from memory as a real decode
step does (the model's other layers run in between); --sets 1 is the earlier, L2-warm setup.
Bytes read are counted from the tensors each contender reads; '% copy' is that over time
against this GPU's device-to-device copy rate measured here. Before timing, each
configuration's output is checked against the reference (gather the selected rows, exact
attention), the Triton selection against torch.topk's set, and the fused step's pages against
the three-launch step's (equal) and its output against the reference over them.

    python benchmarks/gpu_page_decode.py [--lengths 32768,131072] [--batches 1,8]
        [--pages 16,64] [--fraction 0.0625] [--sets 4] [--sweep] [--no-table]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench, do_bench_cudagraph

from kvlens_kernels.page_bounds import page_bounds_triton
from kvlens_kernels.page_decode import page_decode_reference, page_decode_triton
from kvlens_kernels.page_select import page_select_triton
from kvlens_kernels.page_step import page_step_triton, step_counters

HQ, HKV, D = 32, 8, 128
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def graph_us(fn: Callable) -> float:
    """Median of CUDA-graph replays, us."""
    return do_bench_cudagraph(fn, return_mode="median") * 1e3


def eager_us(fn: Callable) -> float:
    """Median of Python launches, us."""
    return do_bench(fn, return_mode="median") * 1e3


def rotating(fns: list[Callable]) -> Callable:
    """One callable that runs the next of ``fns`` on each call (captured graphs cycle too)."""
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = min(do_bench(lambda: dst.copy_(src)), do_bench_cudagraph(lambda: dst.copy_(src)))
    return 2 * src.nbytes / ms / 1e-3


@dataclass
class Inputs:
    """One independent input set: q [B, Hq, D], K/V [B, Hkv, T, D], summaries per page size."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    summaries: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def sdpa(self) -> torch.Tensor:
        return F.scaled_dot_product_attention(self.q[:, :, None], self.k, self.v, enable_gqa=True)


def make_inputs(b: int, t: int, pages: list[int], seed: int) -> Inputs:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16, generator=g)
    summaries = {}
    for page in pages:
        grouped = k.view(b, HKV, t // page, page, D)
        summaries[page] = (grouped.amin(3).contiguous(), grouped.amax(3).contiguous())
    lengths = torch.full((b, HKV), t, device="cuda", dtype=torch.int32)
    return Inputs(q, k, v, lengths, summaries)


def sdpa_times(sets: list[Inputs]) -> tuple[float, dict[str, float]]:
    """Default-backend time (us) and each forced backend's that runs."""
    default = graph_us(rotating([s.sdpa for s in sets]))
    forced = {}
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                sets[0].sdpa()
                forced[name] = graph_us(rotating([s.sdpa for s in sets]))
        except RuntimeError:
            forced[name] = float("nan")
    return default, forced


def topk_pages(bounds: torch.Tensor, n_sel: int) -> torch.Tensor:
    return torch.topk(bounds, n_sel, dim=-1, sorted=False).indices


def attend(
    s: Inputs, pages: torch.Tensor, counts: torch.Tensor, page: int, n_sel: int, scale: float,
    **launch,
) -> torch.Tensor:  # fmt: skip
    """Attention over the chosen pages only (the Triton page decode)."""
    return page_decode_triton(
        s.q, s.k, s.v, s.lengths, pages, counts, page_size=page, scale=scale, max_pages=n_sel,
        **launch,
    )  # fmt: skip


def quest_step(
    s: Inputs, page: int, n_sel: int, counts: torch.Tensor, scale: float, select: Callable,
    **launch,
) -> torch.Tensor:  # fmt: skip
    """Bounds -> top pages -> attention over those pages: one decode step's attention."""
    kmin, kmax = s.summaries[page]
    bounds = page_bounds_triton(s.q, kmin, kmax, pool="max")  # [B, Hkv, N_pages]
    return attend(s, select(bounds, n_sel), counts, page, n_sel, scale, **launch)


def fused_step(
    s: Inputs, page: int, n_sel: int, scale: float, counters: torch.Tensor, **launch
) -> torch.Tensor:
    """The same step in two launches (``kvlens_kernels.page_step``): its output."""
    kmin, kmax = s.summaries[page]
    return page_step_triton(
        s.q, s.k, s.v, s.lengths, kmin, kmax, n_sel, page_size=page, scale=scale,
        counters=counters, **launch,
    ).out  # fmt: skip


def check(s: Inputs, page: int, n_sel: int, scale: float) -> str:
    """Both three-launch steps equal exact attention over the pages they chose; the fused step
    chose the Triton selection's pages and equals exact attention over them; the Triton
    selection's set against torch.topk's (distinct random bounds: the same set). Returns
    'same'/'N differ'."""
    kmin, kmax = s.summaries[page]
    bounds = page_bounds_triton(s.q, kmin, kmax, pool="max")
    counts = torch.full_like(s.lengths, n_sel)
    for select in (topk_pages, page_select_triton):
        got = quest_step(s, page, n_sel, counts, scale, select).float()
        pages = select(bounds, n_sel)
        want = page_decode_reference(
            s.q, s.k, s.v, s.lengths, pages, counts, page_size=page, scale=scale
        ).float()
        err = (got - want).abs().max().item()
        assert err < 2e-2, f"page decode ({select.__name__}) differs from its reference by {err}"
    fused = page_step_triton(
        s.q, s.k, s.v, s.lengths, kmin, kmax, n_sel, page_size=page, scale=scale
    )
    assert torch.equal(fused.pages, page_select_triton(bounds, n_sel)), "fused step's pages"
    want = page_decode_reference(
        s.q, s.k, s.v, s.lengths, fused.pages, counts, page_size=page, scale=scale
    ).float()
    err = (fused.out.float() - want).abs().max().item()
    assert err < 2e-2, f"the fused step differs from its reference by {err}"
    fast = page_select_triton(bounds, n_sel).long()
    ref = topk_pages(bounds, n_sel).sort(-1).values
    differ = int((fast != ref).any(-1).sum())
    return "same" if differ == 0 else f"{differ} heads differ"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--pages", default="16,64", help="page sizes (tokens)")
    parser.add_argument("--fraction", type=float, default=1 / 16, help="share of tokens read")
    parser.add_argument("--sets", type=int, default=4, help="input sets rotated over")
    parser.add_argument("--sweep", action="store_true", help="launch settings at 128k")
    parser.add_argument("--no-table", action="store_true", help="only the sweep")
    args = parser.parse_args()
    bw = copy_bandwidth()
    pages = [int(x) for x in args.pages.split(",")]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(
        f"copy bandwidth: {bw / 1e12:.2f} TB/s; times: median of CUDA-graph replays, us; "
        f"{args.sets} input set(s) rotated"
    )
    print(f"sparse step: Quest bounds + top pages + page attention, {args.fraction:.4f} of tokens")
    scale = D**-0.5
    if not args.no_table:
        print(
            "| batch | tokens | page | SDPA default us | SDPA flash / efficient / cudnn us | "
            "bounds us | torch.topk us | select us | attend us | step topk us | x SDPA | "
            "step select us | x SDPA | eager x | fused us | x SDPA | MB read | % copy | "
            "fused % copy | SDPA % copy | set |"
        )
        print(
            "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
            "|---:|---:|---|"
        )
    for b in [int(x) for x in args.batches.split(",")] if not args.no_table else []:
        for t in [int(x) for x in args.lengths.split(",")]:
            sets = [make_inputs(b, t, pages, t + b + 1000 * i) for i in range(args.sets)]
            sdpa_us, forced = sdpa_times(sets)
            sdpa_bytes = sets[0].k.nbytes + sets[0].v.nbytes
            eager_sdpa = eager_us(rotating([s.sdpa for s in sets]))
            for page in pages:
                n_sel = max(1, round(t // page * args.fraction))
                same = check(sets[0], page, n_sel, scale)
                bounds = [page_bounds_triton(s.q, *s.summaries[page]) for s in sets]
                fixed = [page_select_triton(x, n_sel) for x in bounds]
                counts = torch.full_like(sets[0].lengths, n_sel)
                parts = [
                    [partial(page_bounds_triton, s.q, *s.summaries[page]) for s in sets],
                    [partial(topk_pages, x, n_sel) for x in bounds],
                    [partial(page_select_triton, x, n_sel) for x in bounds],
                    [
                        partial(attend, s, f, counts, page, n_sel, scale)
                        for s, f in zip(sets, fixed)
                    ],
                ]
                part_us = [graph_us(rotating(fns)) for fns in parts]
                steps = {
                    name: rotating(
                        [partial(quest_step, s, page, n_sel, counts, scale, fn) for s in sets]
                    )
                    for name, fn in (("topk", topk_pages), ("select", page_select_triton))
                }
                counters = step_counters(b, HKV, "cuda")  # left zero by every step
                steps["fused"] = rotating(
                    [partial(fused_step, s, page, n_sel, scale, counters) for s in sets]
                )
                step_us = {name: graph_us(fn) for name, fn in steps.items()}
                eager = eager_us(steps["select"])
                read = sum(x.nbytes for x in sets[0].summaries[page])
                read += 2 * bounds[0].nbytes  # bounds written and read
                read += 2 * b * HKV * n_sel * page * D * 2  # the pages' K and V, fp16
                backends = " / ".join(f"{forced[n]:.1f}" for n in ("flash", "efficient", "cudnn"))
                print(
                    f"| {b} | {t} | {page} | {sdpa_us:.1f} | {backends} | "
                    + " | ".join(f"{x:.1f}" for x in part_us)
                    + f" | {step_us['topk']:.1f} | {sdpa_us / step_us['topk']:.2f} | "
                    f"{step_us['select']:.1f} | {sdpa_us / step_us['select']:.2f} | "
                    f"{eager_sdpa / eager:.2f} | {step_us['fused']:.1f} | "
                    f"{sdpa_us / step_us['fused']:.2f} | {read / 2**20:.1f} | "
                    f"{100 * read / (step_us['select'] * 1e-6) / bw:.0f} | "
                    f"{100 * read / (step_us['fused'] * 1e-6) / bw:.0f} | "
                    f"{100 * sdpa_bytes / (sdpa_us * 1e-6) / bw:.0f} | {same} |",
                    flush=True,
                )
            del sets
            torch.cuda.empty_cache()
    if not args.no_table:
        print(
            "x SDPA: SDPA default time over the sparse step's, both CUDA-graph replays; eager x: "
            "the same ratio for the select step, both launched from Python. fused: the step in two "
            "launches (kvlens_kernels.page_step), the same pages as the select step. MB read: "
            "summaries + bounds + selected pages; % copy: of the select step, fused % copy: of "
            "the fused step. set: the Triton selection against torch.topk's."
        )
    if args.sweep:
        sweep(scale, args.fraction, args.sets)


def sweep(scale: float, fraction: float, n_sets: int) -> None:
    """Launch settings at 128k, batch 1: the page attention over fixed pages (block, warps,
    stages, waves of splits), the bounds (pages per program, warps), and the selection (probes
    per pass, warps) over 512 / 2048 / 8192 pages per head; then the fused step's launch B
    (warps, probes per pass, waves of splits) at batch 1, 32k and 128k."""
    t, b = 131072, 1
    sets = [make_inputs(b, t, [16, 64], 7 + i) for i in range(n_sets)]
    print("\n| page | block_n | warps | stages | waves | attend us |")
    print("|---:|---:|---:|---:|---:|---:|")
    for page in (16, 64):
        n_sel = round(t // page * fraction)
        g = torch.Generator(device="cuda").manual_seed(page)
        fixed = [
            torch.stack(
                [torch.randperm(t // page, device="cuda", generator=g)[:n_sel] for _ in range(HKV)]
            )
            .view(b, HKV, n_sel)
            .int()
            for _ in sets
        ]
        counts = torch.full((b, HKV), n_sel, device="cuda", dtype=torch.int32)
        for block_n, warps, stages, waves in itertools.product(
            (32, 64), (2, 4), (3,), (1, 2, 4, 8)
        ):
            fns = [
                partial(
                    attend,
                    s,
                    f,
                    counts,
                    page,
                    n_sel,
                    scale,
                    block_n=block_n,
                    waves=waves,
                    num_warps=warps,
                    num_stages=stages,
                )  # fmt: skip
                for s, f in zip(sets, fixed)
            ]
            us = graph_us(rotating(fns))
            print(f"| {page} | {block_n} | {warps} | {stages} | {waves} | {us:.1f} |", flush=True)
    print("\n| page | block_p | warps | bounds us |")
    print("|---:|---:|---:|---:|")
    for page in (16, 64):
        for block_p, warps in itertools.product((32, 64, 128), (2, 4, 8)):
            fns = [
                partial(
                    page_bounds_triton, s.q, *s.summaries[page], block_p=block_p, num_warps=warps
                )  # fmt: skip
                for s in sets
            ]
            print(f"| {page} | {block_p} | {warps} | {graph_us(rotating(fns)):.1f} |", flush=True)
    print("\n| rows | pages | k | probes | warps | select us | torch.topk us |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rows, n in itertools.product((8,), (512, 2048, 8192)):
        bounds = torch.randn(rows, n, device="cuda")
        k = n // 16
        topk_time = graph_us(partial(topk_pages, bounds, k))
        for probes, warps in itertools.product((1, 4, 8), (4, 8, 16)):
            fn = partial(page_select_triton, bounds, k, probes=probes, num_warps=warps)
            print(
                f"| {rows} | {n} | {k} | {probes} | {warps} | {graph_us(fn):.1f} | "
                f"{topk_time:.1f} |",
                flush=True,
            )
    del sets
    print("\n| tokens | page | warps | probes | waves | fused us |")
    print("|---:|---:|---:|---:|---:|---:|")
    for t in (32768, 131072):
        fused_sets = [make_inputs(b, t, [16, 64], 11 + i) for i in range(n_sets)]
        counters = step_counters(b, HKV, "cuda")
        for page in (16, 64):
            n_sel = round(t // page * fraction)
            for warps, probes, waves in itertools.product((4, 8, 16), (1, 4, 8, 16), (1, 2)):
                launch = {"num_warps": warps, "probes": probes, "waves": waves}
                fns = [
                    partial(fused_step, s, page, n_sel, scale, counters, **launch)
                    for s in fused_sets
                ]
                us = graph_us(rotating(fns))
                print(f"| {t} | {page} | {warps} | {probes} | {waves} | {us:.1f} |", flush=True)
        del fused_sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
