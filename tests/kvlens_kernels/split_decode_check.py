"""Run under TRITON_INTERPRET=1: the split combine against the log-sum-exp weighting computed
in float64, with split counts below, at and past one chunk of loads (so the running maximum
rescales across chunks), empty splits (LSE -inf) among them and a row whose splits are all
empty."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kvlens_kernels.split_decode import combine_splits, group_pad  # noqa: E402

CASES = [(1, 4, 2, 3, 32), (2, 8, 2, 64, 128), (1, 4, 1, 150, 128), (1, 6, 2, 300, 64)]
for bsz, hq, hkv, n_splits, d in CASES:  # d > 32: several programs per row, one per 32 channels
    torch.manual_seed(n_splits)
    group = hq // hkv
    gp = group_pad(group)
    o_part = torch.randn(bsz * hkv * n_splits * gp, d)
    # LSEs that grow along the splits, so a later chunk holds the maximum
    l_part = torch.randn(bsz * hkv, n_splits, gp) * 4 + torch.linspace(0, 30, n_splits)[:, None]
    l_part[:, ::7] = float("-inf")  # empty splits
    if bsz * hkv > 1:
        l_part[-1] = float("-inf")  # every split of the last (batch, KV head) empty
    got = combine_splits(o_part, l_part.reshape(-1), bsz, hq, group, n_splits, d, torch.float32)
    lse = l_part.double().reshape(bsz, hkv, n_splits, gp)[..., :group]
    o = o_part.double().reshape(bsz, hkv, n_splits, gp, d)[..., :group, :]
    w = torch.exp2(lse - lse.amax(2, keepdim=True).clamp(min=-1e30)).nan_to_num(0.0)
    want = (w[..., None] * o).sum(2) / w.sum(2)[..., None].clamp(min=1e-300)
    want = want.reshape(bsz, hkv * group, d)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5, msg=str(n_splits))
print(f"ok: {len(CASES)} cases")
sys.exit(0)
