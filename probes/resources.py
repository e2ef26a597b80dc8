"""Estimate the memory a probe or comparison needs, and refuse before starting what won't fit.

Estimates are deliberately simple upper-bound sums (stated in ``estimate_probe_bytes``); they
exist to turn "the machine died" into one clear message with a suggestion.
"""

from __future__ import annotations

from pathlib import Path

import torch

from probes.errors import KvlensError
from probes.models import ModelFacts

GiB = 2**30


def available_bytes(device: torch.device | str) -> int:
    """Free memory on ``device``: CUDA's free memory, or the kernel's MemAvailable on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def estimate_probe_bytes(
    facts: ModelFacts,
    n_tokens: int,
    *,
    attention: str,
    kv: bool,
    n_layers: int,
    generate: int = 0,
    hidden: int | None = None,
) -> int:
    """Upper-bound bytes a probe adds over the loaded model:
    activations (~16 float32 vectors of the hidden size per token, plus the MLP's width),
    recorded K/V (3 tensors per layer, float32 on the CPU), statistics (12 float32 values per
    head and token per layer, twice for the tables), full maps (float16 stored + one float32
    layer while computing) and the step rows of generate mode."""
    t = n_tokens + generate
    hidden = hidden or facts.n_heads * facts.head_dim
    activations = 16 * t * hidden * 4 * 4
    kv_bytes = 3 * n_layers * facts.n_kv_heads * t * facts.head_dim * 4 if kv else 0
    stats = 2 * 12 * n_layers * facts.n_heads * t * 4 if attention in ("stats", "full") else 0
    maps = 0
    if attention == "full":
        maps = (
            n_layers * facts.n_heads * n_tokens * n_tokens * 2
            + facts.n_heads * n_tokens * n_tokens * 4
        )
    steps = generate * n_layers * facts.n_heads * t * 4 * 8
    return activations + kv_bytes + stats + maps + steps


def check_fits(need: int, device: torch.device | str, what: str, suggestion: str) -> None:
    """Raise a one-line KvlensError when ``need`` bytes exceed 90% of what ``device`` has free."""
    free = available_bytes(device)
    if need > 0.9 * free:
        raise KvlensError(
            f"{what} needs about {need / GiB:.1f} GiB but {free / GiB:.1f} GiB are free on "
            f"{torch.device(device).type}; {suggestion}"
        )
