"""GPU benchmark: the whole-model statistics probe on a Llama-3-8B-shaped model.

Random weights (speed does not depend on them), bf16, one GPU, transformers. For each length:
the plain forward through kvlens' attention with nothing recorded (SDPA, is_causal), and
`capture(attention="stats", kv=False)`, whose forward runs the Triton statistics kernels in
every layer; then the time to turn the statistics into tables. Prints ratios from one run.

    python benchmarks/gpu_probe_model.py [--lengths 8192,32768,131072] [--layers 32]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from probes.attention import install_key_hooks, register_kvlens_attention
from probes.capture import capture


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args()
    register_kvlens_attention()
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    )
    cfg._attn_implementation = "kvlens"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    install_key_hooks(model)
    print(
        f"device: {torch.cuda.get_device_name()}, {args.layers} layers, weights "
        f"{sum(p.numel() for p in model.parameters()) / 1e9:.1f} B params"
    )
    print(
        "| tokens | SDPA forward s | stats probe forward s | ratio | tables s | peak GiB plain | peak GiB stats |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for t in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (1, t), device="cuda")

        def plain(ids=ids):
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        plain()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        plain()
        torch.cuda.synchronize()
        t_plain = time.perf_counter() - t0
        m_plain = torch.cuda.max_memory_allocated() / 2**30
        capture(model, None, ids[0], attention="stats", kv=False)  # warm-up (compiles kernels)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trace = capture(model, None, ids[0], attention="stats", kv=False)
        m_stats = torch.cuda.max_memory_allocated() / 2**30
        fwd = trace.timings["forward_s"]
        print(
            f"| {t} | {t_plain:.3f} | {fwd:.3f} | {fwd / t_plain:.2f} | {trace.timings['tables_s']:.2f} | "
            f"{m_plain:.1f} | {m_stats:.1f} |",
            flush=True,
        )
        del trace
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
