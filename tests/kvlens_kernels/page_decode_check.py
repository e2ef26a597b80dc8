"""Run under TRITON_INTERPRET=1: the page-sparse decode kernel against its reference (tiny
shapes): pages of several sizes, partial last pages, heads reading different page counts,
one reading none, and token-level selection (page size 1)."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kvlens_kernels.page_decode import page_decode_reference, page_decode_triton  # noqa: E402

CASES = [  # (B, Hq, Hkv, capacity, D, page size, split_len)
    (1, 4, 2, 64, 16, 16, None),
    (2, 6, 2, 70, 16, 8, 16),  # several splits, a partial last page
    (1, 2, 2, 33, 32, 1, 8),  # token-level selection
    (1, 8, 1, 96, 16, 24, 32),  # a page size that is not a power of two
    (1, 4, 2, 200, 32, 64, None),
]
for bsz, hq, hkv, cap, d, page, split in CASES:
    torch.manual_seed(cap + page)
    q = torch.randn(bsz, hq, d)
    k, v = torch.randn(bsz, hkv, cap, d), torch.randn(bsz, hkv, cap, d)
    lengths = torch.randint(cap // 2, cap + 1, (bsz, hkv))
    lengths[0, 0] = cap
    n_total = (lengths + page - 1) // page  # pages each head holds
    most = int(n_total.max())
    pages = torch.zeros(bsz, hkv, most, dtype=torch.int32)
    n_pages = torch.zeros(bsz, hkv, dtype=torch.int32)
    for b in range(bsz):
        for h in range(hkv):
            n = int(torch.randint(1, int(n_total[b, h]) + 1, ()))
            chosen = torch.randperm(int(n_total[b, h]))[:n].sort().values
            chosen[-1] = int(n_total[b, h]) - 1 if b == 0 else chosen[-1]  # the partial page
            chosen = chosen.unique()
            pages[b, h, : chosen.numel()] = chosen.to(torch.int32)
            pages[b, h, chosen.numel() :] = 10**6  # never read: past n_pages
            n_pages[b, h] = chosen.numel()
    if bsz * hkv > 1:
        n_pages[-1, -1] = 0  # a head that reads nothing
    args = dict(page_size=page, scale=d**-0.5)
    want = page_decode_reference(q, k, v, lengths, pages, n_pages, **args)
    # blocks of several pages, and pages across blocks; int32 and int64 (top-k's) page tables
    for block_n, table in ((None, pages), (16, pages.long())):
        got = page_decode_triton(
            q, k, v, lengths, table, n_pages, split_len=split, block_n=block_n, **args
        )
        case = str((bsz, hq, hkv, cap, d, page, split, block_n))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=case)
print(f"ok: {len(CASES)} cases")
sys.exit(0)
