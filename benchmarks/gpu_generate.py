"""GPU benchmark of issue 12, end to end: greedy generation of --new tokens after a --prompt
token prompt on a Llama-3-8B-shaped model (random weights, bf16, transformers, one GPU).

Full cache (transformers' DynamicCache, SDPA attention) vs kvlens compressed caches whose
decode steps run the Triton decode kernels: KIVI-2 (quantised decode over the packed codes)
and SnapKV keeping 10% of the prompt (sparse decode over the compact kept rows). Prints
prefill time, decode tokens per second (after the first token), cache bytes and peak memory,
measured in one run, and whether the compressed runs chose the same first tokens.

    python benchmarks/gpu_generate.py [--prompt 32768] [--new 128] [--layers 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from methods.cache import CompressedCache, full_cache_nbytes
from methods.registry import create
from probes.attention import register_kvlens_attention
from probes.compat import cache_arg


def generate(model, ids: torch.Tensor, cache, new: int) -> tuple[list[int], float, float]:
    """Greedy tokens, prefill seconds, decode seconds (for new - 1 steps)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=ids, **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        tokens = [tok]
        for _ in range(new - 1):
            out = model(input_ids=tok, **cache_arg(model, cache), use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok)
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    return [int(t) for t in torch.cat(tokens, 1)[0].tolist()], t1 - t0, t2 - t1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--methods", default="kivi:bits=2,group=128,residual=128;snapkv10")
    parser.add_argument("--profile", default="", help="write a torch.profiler table of decode")
    args = parser.parse_args()
    register_kvlens_attention()
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0,
    )  # fmt: skip
    cfg._attn_implementation = "kvlens"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), device="cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{args.layers} layers, prompt {args.prompt} tokens, {args.new} new tokens, bf16")
    print("| cache | prefill s | decode tok/s | cache MiB | vs full | peak GiB | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    specs = args.methods.split(";")
    runs = [("full (DynamicCache, transformers SDPA)", None)] + [
        (s, s.replace("snapkv10", f"snapkv:budget={args.prompt // 10},window=32")) for s in specs
    ]
    reference = None
    for label, spec in runs:
        # the full cache runs transformers' own SDPA attention; compressed caches need kvlens'
        model.set_attn_implementation("sdpa" if spec is None else "kvlens")
        for warm in (True, False):  # the first run compiles the kernels
            cache = DynamicCache() if spec is None else CompressedCache(model, create(spec))
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            n_new = 4 if warm else args.new
            tokens, t_prefill, t_decode = generate(model, ids, cache, n_new)
        total = args.prompt + args.new
        full = full_cache_nbytes(model, total)
        nbytes = full if spec is None else cache.nbytes()
        reference = tokens if reference is None else reference
        same = sum(a == b for a, b in zip(tokens, reference, strict=True))
        print(
            f"| {label} | {t_prefill:.2f} | {(args.new - 1) / t_decode:.1f} | "
            f"{nbytes / 2**20:.0f} | {nbytes / full:.3f} | "
            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} | {same}/{len(tokens)} |",
            flush=True,
        )
        if args.profile:
            profile(model, ids, spec, args.profile)
        del cache


def profile(model, ids, spec, path) -> None:
    """Append the top operators of 8 decode steps to ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cache = DynamicCache() if spec is None else CompressedCache(model, create(spec))
    generate(model, ids, cache, 2)
    tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.inference_mode():
            for _ in range(8):
                model(input_ids=tok, **cache_arg(model, cache), use_cache=True)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    table_gpu = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    with open(path, "a") as f:
        f.write(f"\n## {spec}\n{table}\n{table_gpu}\n")


if __name__ == "__main__":
    main()
