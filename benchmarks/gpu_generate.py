"""GPU benchmark of issues 12 and 26, end to end: greedy generation of --new tokens after a
--prompt token prompt on a Llama-3-8B-shaped model (random weights, bf16, transformers, one GPU).

Rows, all measured in one run on one model:

* the plain-transformers anchors (no kvlens code on the path): ``generate`` with its
  DynamicCache and SDPA, and with ``cache_implementation="static"`` (its forward compiled);
  each timed as a ``max_new_tokens = min_new_tokens = --new`` run minus a 1-token run, so the
  prefill cancels;
* the loop this benchmark ran before (``--eager``): one ``model(...)`` call per token on a
  DynamicCache (transformers' SDPA, then kvlens' registered function) and on the compressed
  caches' eager kernel path (``methods.cache``);
* kvlens' fast decoder (``methods.fast_decode``): capacity buffers, lengths on the device, the
  whole step replayed from a CUDA graph, for the full cache and the compressed caches (KIVI-2
  through the quantised kernel, SnapKV keeping 10% of the prompt through the sparse kernel;
  H2O, TOVA and StreamingLLM at 10% evicting at every step, ranked on the device inside
  the graph).
  ``--methods`` takes specs separated by ';' and the short names snapkv10, h2o10, tova10,
  streamingllm10.

Decode tokens/s counts the --new - 1 steps after the prefill's token. Each prompt length in
--prompt (comma-separated) runs every row; ``--no-anchors`` / ``--no-eager`` leave rows out.

    python benchmarks/gpu_generate.py [--prompt 32768,131072] [--new 65] [--layers 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from methods.cache import CompressedCache, full_cache_nbytes
from methods.fast_decode import FastDecoder, decode_layers
from methods.registry import create
from probes.attention import register_kvlens_attention
from probes.compat import cache_arg


def _sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def prefill(model, ids: torch.Tensor, cache) -> tuple[torch.Tensor, float]:
    """The prefill's greedy token [1, 1] and its seconds."""
    t0 = _sync_time()
    out = model(input_ids=ids, **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return tok, _sync_time() - t0


def eager_loop(model, ids, cache, new: int) -> tuple[list[int], float, float]:
    """The benchmark's old loop: greedy tokens, prefill s, decode s (new - 1 steps)."""
    tok, t_prefill = prefill(model, ids, cache)
    tokens = [tok]
    t0 = _sync_time()
    for _ in range(new - 1):
        out = model(input_ids=tok, **cache_arg(model, cache), use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(tok)
    t_decode = _sync_time() - t0
    return torch.cat(tokens, 1)[0].tolist(), t_prefill, t_decode


def fast(model, ids, cache, new: int) -> tuple[list[int], float, float, FastDecoder]:
    """The fast decoder: the first decode step compiles and captures; the other new - 2 steps
    replay the graph and are timed (decode s scaled to new - 1 steps)."""
    tok, t_prefill = prefill(model, ids, cache)
    decoder = FastDecoder(model, decode_layers(cache, new))
    del cache
    second = decoder.generate(tok, 1)
    t0 = _sync_time()
    rest = decoder.generate(decoder.token.clone(), new - 2)
    t_decode = (_sync_time() - t0) * (new - 1) / (new - 2)
    tokens = torch.cat([tok[0], second, rest]).tolist()
    return tokens, t_prefill, t_decode, decoder


def anchor(model, ids, new: int, static: bool) -> tuple[list[int], float, float]:
    """Plain ``generate`` (no kvlens code): prefill s (the 1-token run), decode s."""
    kw = dict(do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    mask = torch.ones_like(ids)
    if static:  # the first run compiles the decode step
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)
    runs = []
    for n in (1, new):
        t0 = _sync_time()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
        runs.append((out, _sync_time() - t0))
    (_, t1), (out, tn) = runs
    return out[0, ids.shape[1] :].tolist(), t1, tn - t1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", default="32768")
    parser.add_argument("--new", type=int, default=65)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--methods", default="kivi:bits=2,group=128,residual=128;snapkv10")
    parser.add_argument("--no-anchors", action="store_true")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--no-static", action="store_true", help="leave out the static anchor")
    parser.add_argument("--profile", default="", help="append CPU profiles of decode here")
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
    for prompt in [int(p) for p in args.prompt.split(",")]:
        run_prompt(model, cfg, prompt, args)


def run_prompt(model, cfg, prompt: int, args) -> None:
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device="cuda")
    ten = prompt // 10
    short = {
        "snapkv10": f"snapkv:budget={ten},window=32",
        "h2o10": f"h2o:budget={ten}",
        "tova10": f"tova:budget={ten}",
        "streamingllm10": f"streamingllm:budget={ten}",
    }
    specs = [short.get(s, s) for s in args.methods.split(";")]
    # the fast decoder first (its full cache is the tokens' reference), the static anchor
    # last (its compilation is the longest part of the run)
    rows = [("kvlens fast decoder, full cache", "fast", None)]
    rows += [(f"kvlens fast decoder, {s}", "fast", s) for s in specs]
    if not args.no_eager:
        rows.append(("old loop, DynamicCache, transformers SDPA", "eager-sdpa", None))
        rows.append(("old loop, DynamicCache, kvlens attention", "eager", None))
        rows += [(f"old loop, {s}", "eager", s) for s in specs]
    if not args.no_anchors:
        rows.append(("transformers generate, DynamicCache, SDPA", "anchor", None))
        if not args.no_static:
            rows.append(('transformers generate, cache="static", compiled', "static", None))
    print(f"\n{args.layers} layers, prompt {prompt} tokens, {args.new} new tokens, bf16")
    print("| what | prefill s | decode tok/s | cache MiB | vs full | peak GiB | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    full = full_cache_nbytes(model, prompt + args.new)
    reference = None
    for label, kind, spec in rows:
        model.set_attn_implementation(
            "sdpa" if kind in ("anchor", "static", "eager-sdpa") else "kvlens"
        )
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        nbytes = full
        with torch.inference_mode():
            if kind in ("anchor", "static"):
                tokens, t_prefill, t_decode = anchor(model, ids, args.new, kind == "static")
                if args.profile and kind == "anchor":
                    profile(model, None, ids, f"{label}, {prompt}", args.profile)
            else:
                cache = DynamicCache() if spec is None else CompressedCache(model, create(spec))
                if kind == "fast":
                    tokens, t_prefill, t_decode, decoder = fast(model, ids, cache, args.new)
                    nbytes = decoder.nbytes() if spec is not None else full
                    del decoder
                else:
                    tokens, t_prefill, t_decode = eager_loop(model, ids, cache, args.new)
                    nbytes = cache.nbytes() if spec is not None else full
                    if args.profile and spec is None:
                        profile(model, cache, tokens[-1], f"{label}, {prompt}", args.profile)
                del cache
        reference = tokens if reference is None else reference
        same = sum(a == b for a, b in zip(tokens, reference, strict=True))
        print(
            f"| {label} | {t_prefill:.2f} | {(args.new - 1) / t_decode:.1f} | "
            f"{nbytes / 2**20:.0f} | {nbytes / full:.3f} | "
            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} | {same}/{len(tokens)} |",
            flush=True,
        )


def profile(model, cache, token, label: str, path: str) -> None:
    """Append the operators taking the most host time over 4 decode steps (the old loop on
    ``cache`` after ``token``; or, with ``cache`` None, a 4-token ``generate`` of ``token``,
    the prompt ids, whose prefill is in the table too)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        if cache is None:
            model.generate(token, attention_mask=torch.ones_like(token), max_new_tokens=4,
                           min_new_tokens=4, do_sample=False, pad_token_id=0)  # fmt: skip
        else:
            tok = torch.tensor([[token]], device="cuda")
            for _ in range(4):
                out = model(input_ids=tok, **cache_arg(model, cache), use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    with open(path, "a") as f:
        f.write(f"\n## {label}\n")
        f.write(averages.table(sort_by="self_cpu_time_total", row_limit=20))
        f.write(averages.table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()
