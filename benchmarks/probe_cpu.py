"""CPU benchmark of the probe on the embedded SmolLM2: plain prefill vs statistics vs eager.

For 512, 1024 and 2048 tokens it times (median of --repeats runs, one process):
  plain   one forward pass through kvlens' attention with nothing recorded (SDPA);
  stats   `capture(attention="stats", kv=False)`: the blockwise statistics of every layer;
  eager   transformers' eager attention with `output_attentions=True`;
and the peak resident memory each adds over the loaded model (Linux VmHWM, reset between
runs through /proc/self/clear_refs). It prints ratios measured in this one run.

    .venv/bin/python benchmarks/probe_cpu.py [--lengths 512,1024,2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from probes import capture, load_model

PASSAGE = (Path(__file__).resolve().parent / "probe_cpu.py").read_text()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, peak extra MiB over the resident size before the runs)."""
    fn()  # warm-up
    base = _rss_kib("VmRSS")
    _reset_peak()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    peak = _rss_kib("VmHWM")
    return statistics.median(times), max(0, peak - base) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", device="cpu")
    ids_all = tok(PASSAGE * 20)["input_ids"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"{'tokens':>6} {'plain s':>8} {'stats s':>8} {'eager s':>8} {'stats/plain':>11} "
        f"{'eager/plain':>11} {'plain MiB':>9} {'stats MiB':>9} {'eager MiB':>9}"
    )
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.tensor([ids_all[:n]])

        def plain(ids=ids):
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

        def stats(ids=ids):
            capture(model, tok, ids[0], attention="stats", kv=False)

        def eager(ids=ids):
            model.set_attn_implementation("eager")
            try:
                with torch.inference_mode():
                    model(input_ids=ids, use_cache=False, output_attentions=True, logits_to_keep=1)
            finally:
                model.set_attn_implementation("kvlens")

        t_plain, m_plain = measure(plain, args.repeats)
        t_stats, m_stats = measure(stats, args.repeats)
        t_eager, m_eager = measure(eager, args.repeats)
        print(
            f"{n:>6} {t_plain:>8.3f} {t_stats:>8.3f} {t_eager:>8.3f} {t_stats / t_plain:>11.2f} "
            f"{t_eager / t_plain:>11.2f} {m_plain:>9.0f} {m_stats:>9.0f} {m_eager:>9.0f}"
        )


if __name__ == "__main__":
    main()
