"""Run under TRITON_INTERPRET=1: the sparse decode kernel against its reference (tiny shapes)."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kvlens_kernels.sparse_decode import sparse_decode_reference, sparse_decode_triton  # noqa: E402

CASES = [  # (B, Hq, Hkv, capacity, D, split_len)
    (1, 4, 2, 40, 16, None),
    (2, 6, 2, 70, 16, 16),  # several splits
    (1, 2, 2, 33, 32, 16),
    (1, 32, 1, 20, 16, None),  # a group larger than the 16-row minimum
]
for bsz, hq, hkv, cap, d, split in CASES:
    torch.manual_seed(cap)
    q = torch.randn(bsz, hq, d)
    k, v = torch.randn(bsz, hkv, cap, d), torch.randn(bsz, hkv, cap, d)
    lengths = torch.randint(1, cap + 1, (bsz, hkv))
    lengths[0, 0] = cap
    got = sparse_decode_triton(q, k, v, lengths, scale=d**-0.5, split_len=split, block_n=16)
    want = sparse_decode_reference(q, k, v, lengths, scale=d**-0.5)
    torch.testing.assert_close(
        got, want, atol=1e-4, rtol=1e-4, msg=str((bsz, hq, hkv, cap, d, split))
    )
print(f"ok: {len(CASES)} cases")
sys.exit(0)
