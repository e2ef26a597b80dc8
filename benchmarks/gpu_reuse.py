"""GPU timing of chunk-cache reuse (issue 25: CacheBlend, Yao et al. 2025; Cache-Craft, Agarwal
et al. 2025; KVCOMM, Ye et al. 2025) on a Llama-3-8B-shaped model with random weights (bf16,
one GPU): time to first token of each method against the full prefill, at 8k-32k tokens.

A prompt is a header, --chunks chunks of random token ids and a question. Chunk caches (each
chunk prefilled alone), Cache-Craft's earlier request and KVCOMM's anchors come from earlier
requests: made once, untimed. Timed (CUDA-synchronised wall time, median of --reps after one
warm-up): the full prefill through transformers' DynamicCache (kvlens' attention function with
no cache layer handed over: SDPA), the full prefill through ``ReuseCache`` (the reuse path's own
cache, SDPA under a position mask), and each method's ``run`` (placing the chunk caches,
recomputing its tokens, the question; by default also copying the question's attention rows
to the host, as the analysis needs: ``--no-record`` leaves that out). Speed does not depend on the weights; quality does and
is measured on SmolLM2 by ``benchmarks/reuse_cpu.py``.

    python benchmarks/gpu_reuse.py [--lengths 8192,32768] [--chunks 8] [--layers 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from methods.reuse import create_reuse
from methods.reuse.base import Context, Layout, Schedule
from methods.reuse.cache import ReuseCache
from methods.reuse.run import prefill_flops
from probes.attention import register_kvlens_attention
from probes.compat import cache_arg

SPECS = "naive,cacheblend:recompute=0.15,cachecraft:recompute=0.15,kvcomm:anchors=3"


def _timed(fn, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_layout(vocab: int, length: int, n_chunks: int, seed: int = 0) -> Layout:
    g = torch.Generator().manual_seed(seed)
    header, question = 32, 32
    per = (length - header - question) // n_chunks

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return Layout(ids(header), [ids(per) for _ in range(n_chunks)], ids(question))


def run_length(
    model, layout: Layout, specs: list[str], reps: int, record: bool = True
) -> list[tuple]:
    ids = torch.tensor([layout.ids], device="cuda")
    n = ids.shape[1]

    def dynamic() -> None:
        with torch.inference_mode():
            model(input_ids=ids, **cache_arg(model, DynamicCache()), use_cache=True,
                  logits_to_keep=1)  # fmt: skip

    def reuse_full() -> None:
        ReuseCache(model).run(model, layout.ids, list(range(n)))

    n_layers = model.config.num_hidden_layers
    full_flops = prefill_flops(model, layout, Schedule([torch.arange(layout.n_context)] * n_layers))
    t_dyn = _timed(dynamic, reps)
    rows = [("full prefill, DynamicCache (SDPA)", t_dyn, 1.0, 0.0)]
    rows.append(("full prefill, ReuseCache", _timed(reuse_full, reps), 1.0, 0.0))
    ctx = Context(model, layout)
    ctx.record = record
    ctx.alone()  # the chunk caches: earlier requests, untimed
    n_chunk = layout.n_context - len(layout.header)
    for spec in specs:
        method = create_reuse(spec)
        _, _, schedule, _ = method.run(ctx)  # fills the earlier request / anchors once
        last = schedule.computed[-1]
        recomputed = float(torch.isin(layout.chunk_positions(), last).sum()) / n_chunk
        saved = 1.0 - prefill_flops(model, layout, schedule) / full_flops
        with torch.inference_mode():
            t = _timed(lambda m=method: m.run(ctx), reps)
        rows.append((spec, t, recomputed, saved))
        del ctx.extra  # keep the anchors' memory bounded: one method's pool at a time
        ctx.extra = {}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default=SPECS)
    parser.add_argument(
        "--no-record",
        action="store_true",
        help="do not copy the question's attention rows to the host (the analysis needs them; "
        "the 2026-12-04 run kept them, so the methods' times include that copy)",
    )
    args = parser.parse_args()
    register_kvlens_attention()
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072 + 1024, rope_theta=500000.0,
    )  # fmt: skip
    cfg._attn_implementation = "kvlens"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    specs = [s for s in args.methods.split(",") if s]
    for length in [int(x) for x in args.lengths.split(",")]:
        layout = make_layout(cfg.vocab_size, length, args.chunks)
        rows = run_length(model, layout, specs, args.reps, record=not args.no_record)
        t_full = rows[0][1]
        print(
            f"\n{len(layout.ids)} tokens: header {len(layout.header)}, {args.chunks} chunks of "
            f"{len(layout.chunks[0])}, question {len(layout.question)}; {args.layers} layers\n"
        )
        print("| method | TTFT ms | vs DynamicCache prefill | recomputed | FLOPs saved |")
        print("|---|---:|---:|---:|---:|")
        for name, t, rec, saved in rows:
            print(f"| {name} | {1000 * t:.1f} | {t_full / t:.2f}x | {rec:.1%} | {saved:.1%} |")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
