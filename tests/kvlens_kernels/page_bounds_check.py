"""Run under TRITON_INTERPRET=1: Quest's page bound kernel against its reference (tiny
shapes), both pools, page counts below, at and past one block."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kvlens_kernels.page_bounds import page_bounds_reference, page_bounds_triton  # noqa: E402

CASES = [(1, 4, 2, 5, 16), (2, 6, 2, 16, 32), (1, 9, 3, 21, 64), (1, 2, 2, 1, 16)]
for bsz, hq, hkv, n_pages, d in CASES:  # (B, Hq, Hkv, pages, D)
    torch.manual_seed(n_pages + d)
    q = torch.randn(bsz, hq, d)
    a, b = torch.randn(bsz, hkv, n_pages, d), torch.randn(bsz, hkv, n_pages, d)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    for pool in ("max", "mean"):
        got = page_bounds_triton(q, kmin, kmax, pool=pool, block_p=16)
        want = page_bounds_reference(q, kmin, kmax, pool=pool)
        case = str((bsz, hq, hkv, n_pages, d, pool))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=case)
print(f"ok: {len(CASES)} cases")
sys.exit(0)
