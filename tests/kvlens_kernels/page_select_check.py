"""Run under TRITON_INTERPRET=1: the page-selection kernel against its reference (small
shapes): random bounds, rows with many ties, a tie across the k-th bound, k = 1, k = N,
k > N, the forced last page, special values (-0.0, +-inf), and rows that are not a power of
two long."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from kvlens_kernels.page_select import page_select_reference, page_select_triton  # noqa: E402


def rows(kind: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Bounds of one kind: distinct random, few distinct values, or one value everywhere."""
    if kind == "random":
        return torch.randn(*shape, generator=g) * 30
    if kind == "ties":
        return torch.randint(0, 4, shape, generator=g).float()
    if kind == "flat":
        return torch.full(shape, 2.5)
    x = torch.randn(*shape, generator=g)  # special values among random ones
    flat = x.view(-1)
    flat[::5] = -0.0
    flat[1::7] = 0.0
    flat[2::11] = float("inf")
    flat[3::13] = float("-inf")
    return x


CASES = [  # (B, Hkv, N, k)
    (1, 2, 37, 5),
    (2, 3, 64, 1),
    (1, 2, 100, 100),
    (1, 1, 20, 33),
    (1, 4, 300, 19),
    (1, 1, 1, 1),
    (2, 2, 513, 32),
]
n_checked = 0
for bsz, hkv, n, k in CASES:
    g = torch.Generator().manual_seed(n * 7 + k)
    for kind in ("random", "ties", "flat", "special"):
        bounds = rows(kind, (bsz, hkv, n), g)
        for force_last in (False, True):
            for probes in (1, 4):
                got = page_select_triton(bounds, k, force_last=force_last, probes=probes)
                want = page_select_reference(bounds, k, force_last=force_last)
                case = str((bsz, hkv, n, k, kind, force_last, probes))
                assert got.shape == (bsz, hkv, min(k, n)), case
                assert torch.equal(got, want), f"{case}\n{got}\n{want}"
                n_checked += 1
        if kind == "random":  # distinct values: the same set as torch.topk
            top = torch.topk(bounds, min(k, n), dim=-1).indices.sort(-1).values
            assert torch.equal(page_select_triton(bounds, k).long(), top), (bsz, hkv, n, k)
print(f"ok: {n_checked} checks")
sys.exit(0)
