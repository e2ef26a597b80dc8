"""Run under TRITON_INTERPRET=1: the quantise-and-pack kernel against its reference."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kvlens_kernels.quantize import quantize_groups_reference, quantize_groups_triton  # noqa: E402

CASES = [  # (heads, tokens, D, group, key bits, value bits, keys per channel)
    (2, 32, 16, 16, 2, 2, True),
    (1, 64, 32, 32, 4, 4, True),
    (2, 16, 16, 8, 8, 8, False),
    (1, 32, 16, 16, 4, 2, False),
]
for h, n, d, group, kb, vb, per_channel in CASES:
    torch.manual_seed(n + d)
    keys = torch.randn(h, n, d) * 3
    values = torch.randn(h, n, d).half().float()
    keys[0, :, 1] = 0.5  # a constant channel: its step underflows and codes must be 0
    args = dict(key_bits=kb, value_bits=vb, group=group, key_per_channel=per_channel)
    got = quantize_groups_triton(keys, values, **args)
    want = quantize_groups_reference(keys, values, **args)
    for name in want.__dataclass_fields__:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype)
        assert torch.equal(a, b), (name, (a != b).sum().item(), (h, n, d, group, kb, vb))
print(f"ok: {len(CASES)} cases")
sys.exit(0)
