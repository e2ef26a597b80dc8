"""Multi-GPU probe check: a random-weight Llama-shaped model spread over two GPUs with
``kvlens probe --device-map auto --max-memory ...`` gives the same statistics and keys as the
same weights on one GPU (for a slice of layers), and both GPUs hold weights.

    python benchmarks/multi_gpu_probe.py --tokenizer .tok --out /tmp/randmodel
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--tokenizer", required=True, help="folder with the SmolLM2 tokenizer files"
    )
    parser.add_argument("--out", default="/tmp/randmodel")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    folder = Path(args.out)
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=49152,
        max_position_embeddings=32768,
        rope_theta=100000.0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    for f in Path(args.tokenizer).iterdir():
        shutil.copy(f, folder / f.name)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    del model
    prompt = folder / "prompt.txt"
    prompt.write_text(
        ("The keeper counted the waves and wrote them down. " * 600)[: args.tokens * 4]
    )
    common = [
        sys.executable,
        "-m",
        "app.cli",
        "probe",
        "--model",
        str(folder),
        "--prompt-file",
        str(prompt),
        "--attention",
        "stats",
        "--layers",
        "0,7,15",
    ]
    runs = {
        "two_gpus": [
            *common,
            "--device-map",
            "auto",
            "--max-memory",
            "0=1GiB,1=6GiB",
            "--out",
            "/tmp/dump_two",
        ],
        "one_gpu": [*common, "--device", "cuda", "--out", "/tmp/dump_one"],
    }
    for name, cmd in runs.items():
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(
            name, "rc", r.returncode, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        )
        if r.returncode:
            print(r.stderr[-2000:])
            return
    from probes import Trace, load_model

    spread, _ = load_model(str(folder), device_map="auto", max_memory={0: "1GiB", 1: "6GiB"})
    placement = sorted({str(v) for v in spread.hf_device_map.values()})
    print("placement of the spread model:", placement)

    two, one = Trace.load("/tmp/dump_two"), Trace.load("/tmp/dump_one")
    ks_two = two.key_stats.sort("layer", "head", "position")
    ks_one = one.key_stats.sort("layer", "head", "position")
    diff_received = float((ks_two["received"] - ks_one["received"]).abs().max())
    diff_key = max(float((two.key(i).float() - one.key(i).float()).abs().max()) for i in (0, 7, 15))
    print(
        json.dumps(
            {
                "params_B": round(params, 2),
                "tokens": two.n_tokens,
                "layers": two.layers,
                "max_abs_diff_received": diff_received,
                "max_abs_diff_keys": diff_key,
                "forward_s_two_gpus": two.timings["forward_s"],
                "forward_s_one_gpu": one.timings["forward_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
