"""Run under TRITON_INTERPRET=1: the two-launch page-sparse step against the three-launch one
and the references (tiny shapes): random and tied bounds (integer inputs, exact in fp16 and
fp32), the forced last page, k >= N (every page: full attention), partial last pages, batch > 1,
one and several query heads per KV head, pages of 1 to 16 rows, several splits and more splits
than one chunk of the in-kernel combine, and the counters left at zero for the next step."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kvlens_kernels.page_bounds import page_bounds_triton  # noqa: E402
from kvlens_kernels.page_decode import page_decode_reference, page_decode_triton  # noqa: E402
from kvlens_kernels.page_select import page_select_triton  # noqa: E402
from kvlens_kernels.page_step import (  # noqa: E402
    page_step_reference,
    page_step_triton,
    step_counters,
)


def inputs(bsz, hq, hkv, cap, d, page, dtype, kind, g):
    """q [B, Hq, D], K/V [B, Hkv, cap, D], lengths inside the last page (so it is partial for
    most heads and every page holds a row), and the pages' min / max over the rows held."""
    if kind == "ties":  # small integers: every bound exact, many equal
        q = torch.randint(-2, 3, (bsz, hq, d), generator=g).float()
        k = torch.randint(-3, 4, (bsz, hkv, cap, d), generator=g).float()
    else:
        q = torch.randn(bsz, hq, d, generator=g)
        k = torch.randn(bsz, hkv, cap, d, generator=g)
    if kind == "flat":  # one bound for every page
        k = torch.ones(bsz, hkv, cap, d)
    v = torch.randn(bsz, hkv, cap, d, generator=g)
    n_pages = -(-cap // page)
    lengths = cap - torch.randint(0, cap - (n_pages - 1) * page, (bsz, hkv), generator=g)
    lengths[0, 0] = cap
    held = torch.arange(n_pages * page)[None, None, :, None] < lengths[..., None, None]
    padded = torch.nn.functional.pad(k, (0, 0, 0, n_pages * page - cap))
    lo = padded.masked_fill(~held, float("inf")).view(bsz, hkv, n_pages, page, d).amin(3)
    hi = padded.masked_fill(~held, float("-inf")).view(bsz, hkv, n_pages, page, d).amax(3)
    return q.to(dtype), k.to(dtype), v.to(dtype), lengths, lo.to(dtype), hi.to(dtype)


def full_attention(q, k, v, lengths, scale):
    """Exact attention over every held row: [B, Hq, D] float32."""
    bsz, hq, _ = q.shape
    group = hq // k.shape[1]
    out = torch.empty(q.shape)
    for b in range(bsz):
        for j in range(hq):
            n = int(lengths[b, j // group])
            keys, vals = k[b, j // group, :n].float(), v[b, j // group, :n].float()
            out[b, j] = torch.softmax(keys @ q[b, j].float() * scale, 0) @ vals
    return out


CASES = [  # (B, Hq, Hkv, capacity, D, page, k, force_last, dtype, kind, pool, split_len, block_n)
    (1, 4, 2, 64, 16, 16, 2, False, torch.float32, "random", "max", None, None),
    (1, 4, 2, 64, 16, 16, 2, False, torch.float32, "random", "max", None, 16),  # in-page blocks
    (2, 6, 2, 70, 16, 8, 3, True, torch.float32, "random", "max", 16, None),
    (1, 8, 2, 45, 32, 4, 5, False, torch.float16, "ties", "max", 4, 16),
    (2, 2, 2, 48, 16, 16, 2, True, torch.float16, "ties", "mean", None, None),  # group of 1
    (1, 4, 1, 40, 16, 8, 99, False, torch.float32, "random", "max", None, None),  # k > N
    (1, 4, 2, 37, 16, 8, 5, True, torch.float16, "random", "max", 8, None),  # k = N, forced
    (1, 2, 1, 90, 16, 1, 40, False, torch.float32, "random", "max", 2, 16),  # 20 splits
    (1, 4, 2, 64, 16, 8, 3, True, torch.float32, "flat", "max", None, None),  # all tied
    (1, 4, 2, 64, 16, 8, 3, False, torch.float16, "flat", "max", 8, None),
]
n_checked = 0
for bsz, hq, hkv, cap, d, page, n_sel, force_last, dtype, kind, pool, split, block_n in CASES:
    case = str((bsz, hq, hkv, cap, d, page, n_sel, force_last, dtype, kind, pool, split, block_n))
    g = torch.Generator().manual_seed(cap * 31 + page + n_sel)
    q, k, v, lengths, kmin, kmax = inputs(bsz, hq, hkv, cap, d, page, dtype, kind, g)
    n_pages = kmin.shape[2]
    scale = d**-0.5
    counters = step_counters(bsz, hkv, "cpu")
    got = page_step_triton(
        q, k, v, lengths, kmin, kmax, n_sel, page_size=page, scale=scale, pool=pool,
        force_last=force_last, counters=counters, split_len=split, block_n=block_n,
    )  # fmt: skip
    kk = min(n_sel, n_pages)
    assert got.out.dtype == dtype and got.out.shape == q.shape, case
    assert got.pages.dtype == torch.int32 and got.pages.shape == (bsz, hkv, kk), case
    # the three-launch step: the same bounds, the same pages, the same attention over them
    bounds = page_bounds_triton(q, kmin, kmax, pool=pool)
    assert torch.equal(got.bounds, bounds), case
    assert torch.equal(got.pages, page_select_triton(bounds, n_sel, force_last=force_last)), case
    counts = torch.full((bsz, hkv), kk)
    args = dict(page_size=page, scale=scale)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    want = page_decode_reference(q, k, v, lengths, got.pages, counts, **args)
    torch.testing.assert_close(got.out.float(), want.float(), **tol, msg=case)
    three = page_decode_triton(q, k, v, lengths, got.pages, counts, split_len=split, **args)
    torch.testing.assert_close(got.out.float(), three.float(), **tol, msg=case)
    if kind != "random":  # exact bounds: the references' pages and output too
        ref = page_step_reference(
            q, k, v, lengths, kmin, kmax, n_sel, page_size=page, scale=scale, pool=pool,
            force_last=force_last,
        )  # fmt: skip
        assert torch.equal(got.pages, ref.pages), f"{case}\n{got.pages}\n{ref.pages}"
        torch.testing.assert_close(got.out.float(), ref.out.float(), **tol, msg=case)
    if kind == "flat":  # every bound equal: the lowest indices (and the forced last page)
        first = list(range(kk - 1)) + [n_pages - 1] if force_last else list(range(kk))
        assert all(row == first for row in got.pages.reshape(-1, kk).tolist()), case
    if n_sel >= n_pages:  # every page read: full attention
        assert got.pages.tolist() == [[list(range(n_pages))] * hkv] * bsz, case
        full = full_attention(q, k, v, lengths, scale)
        torch.testing.assert_close(got.out.float(), full, **tol, msg=case)
    # every head's last program put its counter back: the next step reuses the buffer
    assert int(counters.abs().sum()) == 0, case
    again = page_step_triton(
        q, k, v, lengths, kmin, kmax, n_sel, page_size=page, scale=scale, pool=pool,
        force_last=force_last, counters=counters, split_len=split, block_n=block_n,
    )  # fmt: skip
    assert torch.equal(again.out, got.out) and torch.equal(again.pages, got.pages), case
    n_checked += 1
print(f"ok: {n_checked} cases")
sys.exit(0)
