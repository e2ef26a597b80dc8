"""Run under TRITON_INTERPRET=1: the Triton statistics kernels against the PyTorch reference
on tiny CPU shapes. Exits non-zero with a message on the first mismatch."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kvlens_kernels.attention_stats import attention_stats_reference  # noqa: E402
from kvlens_kernels.attention_stats_triton import (  # noqa: E402
    attention_stats_fast,
    attention_stats_triton,
)

CASES = [  # (Hq, Hkv, Tq, Tk, D, sliding)
    (4, 2, 37, 37, 16, None),
    (2, 1, 20, 53, 32, None),  # queries are the last 20 of 53 positions
    (4, 1, 40, 40, 16, 7),  # sliding window
    (2, 2, 5, 5, 16, None),
    (2, 1, 70, 70, 16, None),  # several far, near and diagonal blocks with 16-wide blocks
]


def check(impl, out_t, st_t, out_r, st_r, case) -> None:
    torch.testing.assert_close(out_t, out_r, atol=1e-4, rtol=1e-4, msg=f"{impl} output {case}")
    for name in (
        "received",
        "window",
        "lse",
        "entropy",
        "sink_mass",
        "max_prob",
        "mean_distance",
        "local_mass",
    ):
        torch.testing.assert_close(
            getattr(st_t, name),
            getattr(st_r, name),
            atol=1e-4,
            rtol=1e-4,
            msg=f"{impl} {name} {case}",
        )


for hq, hkv, tq, tk, d, sliding in CASES:
    torch.manual_seed(hq * 100 + tk)
    q, k, v = torch.randn(hq, tq, d), torch.randn(hkv, tk, d), torch.randn(hkv, tk, d)
    kwargs = {"scale": d**-0.5, "window": 6, "sinks": 3, "local": 5, "sliding_window": sliding}
    out_r, st_r = attention_stats_reference(q, k, v, **kwargs)
    # the two passes, and the one statistics pass over the forward's LSE (what CUDA runs
    # over SDPA's LSE; with a sliding window the two passes' result is returned)
    for impl in (attention_stats_triton, attention_stats_fast):
        out_t, st_t = impl(q, k, v, **kwargs)
        check(impl.__name__, out_t, st_t, out_r, st_r, (hq, hkv, tq, tk, d, sliding))
print(f"ok: {len(CASES)} cases")
sys.exit(0)
