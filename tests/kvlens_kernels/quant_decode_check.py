"""Run under TRITON_INTERPRET=1: quantised decode (KIVI layout) against its reference, on
codes made by the quantise-and-pack kernel."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kvlens_kernels.quant_decode import QuantKV, quant_decode_reference, quant_decode_triton  # noqa: E402
from kvlens_kernels.quantize import empty_blocks, quantize_groups_triton  # noqa: E402

CASES = [  # (B, Hq, Hkv, quantised tokens, residual, D, group, k bits, v bits, per channel, split)
    (1, 4, 2, 64, 5, 128, 16, 2, 2, True, None),
    (2, 6, 2, 96, 0, 64, 32, 4, 4, True, 32),
    (1, 2, 1, 32, 17, 64, 16, 4, 4, True, 16),
    (1, 4, 2, 48, 3, 32, 16, 8, 8, False, 16),
    (1, 4, 4, 0, 9, 128, 16, 2, 2, True, None),  # nothing quantised yet: the residual only
    (1, 4, 2, 32, 4, 128, 16, 4, 2, True, 16),  # 4-bit keys, 2-bit values
    (1, 4, 2, 48, 2, 128, 16, 2, 2, False, 32),  # per-token keys, the last split shorter
    (1, 4, 2, 96, 3, 128, 32, 4, 4, True, 48),  # splits of 1.5 key groups: one starts mid-group
]
SCHEDULES = [(False, False, False), (True, False, True), (True, True, False)]
for bsz, hq, hkv, n, r, d, group, kb, vb, per_channel, split in CASES:
    torch.manual_seed(n + r + d)
    keys = torch.randn(bsz * hkv, n, d) * 2
    keys[..., 3] += 6  # an outlier channel
    values = torch.randn(bsz * hkv, n, d)
    args = dict(key_bits=kb, value_bits=vb, group=group, key_per_channel=per_channel)
    if n:
        blocks = quantize_groups_triton(keys, values, **args)
    else:  # nothing quantised yet: empty code buffers of the right rank
        blocks = empty_blocks(bsz * hkv, 0, d, kb, vb, group, per_channel, "cpu")
    cache = QuantKV.from_blocks(
        blocks,
        torch.randn(bsz, hkv, r + 4, d),  # capacity beyond the residual in use
        torch.randn(bsz, hkv, r + 4, d),
        n_residual=r,
        **args,
    )
    q = torch.randn(bsz, hq, d)
    want = quant_decode_reference(q, cache, scale=d**-0.5)
    # the residual read by the last split or its own; the loop plain (the folded query held
    # per key group or refolded per tile) or skewed by one tile
    for residual_split, overlap, per_group in SCHEDULES:
        got = quant_decode_triton(
            q, cache, scale=d**-0.5, split_len=split, block_n=16, residual_split=residual_split,
            overlap=overlap, fold_per_group=per_group,
        )  # fmt: skip
        case = str((bsz, hq, n, r, d, kb, residual_split, overlap, per_group))
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=case)
print(f"ok: {len(CASES)} cases")
sys.exit(0)
