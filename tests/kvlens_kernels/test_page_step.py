"""The two-launch page-sparse step (Quest, Tang et al. 2024): its reference is the three
references in a row, reads every row when k >= N (full attention), keeps the forced last page
and takes the lowest indices among tied bounds; the CPU dispatcher is the reference; the Triton
step equals the three-launch step and the references in Triton's CPU interpreter, and its
second launch compiles for an H100 (sm_90) with the per-head counter ordered after the partials."""

from __future__ import annotations

import pytest
import torch

from kvlens_kernels.page_bounds import page_bounds_reference
from kvlens_kernels.page_decode import page_decode_reference
from kvlens_kernels.page_select import MAX_PAGES, page_select_reference
from kvlens_kernels.page_step import page_step, page_step_reference
from tests.kvlens_kernels.interpreter import needs_triton, run_check


def _inputs(seed: int, bsz=2, hq=4, hkv=2, cap=50, d=16, page=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, d, generator=g)
    k, v = torch.randn(bsz, hkv, cap, d, generator=g), torch.randn(bsz, hkv, cap, d, generator=g)
    n_pages = -(-cap // page)
    padded = torch.nn.functional.pad(k, (0, 0, 0, n_pages * page - cap))
    held = (torch.arange(n_pages * page) < cap)[:, None]
    lo = padded.masked_fill(~held, float("inf")).view(bsz, hkv, n_pages, page, d).amin(3)
    hi = padded.masked_fill(~held, float("-inf")).view(bsz, hkv, n_pages, page, d).amax(3)
    lengths = torch.full((bsz, hkv), cap)
    return q, k, v, lengths, lo, hi


def test_reference_is_the_three_references_in_a_row_and_the_cpu_dispatcher():
    q, k, v, lengths, lo, hi = _inputs(0)  # 50 rows in pages of 8: the last page holds 2
    got = page_step_reference(q, k, v, lengths, lo, hi, 3, page_size=8, scale=0.25)
    bounds = page_bounds_reference(q, lo, hi)
    pages = page_select_reference(bounds, 3)
    want = page_decode_reference(
        q, k, v, lengths, pages, torch.full((2, 2), 3), page_size=8, scale=0.25
    )
    assert torch.equal(got.bounds, bounds) and torch.equal(got.pages, pages)
    assert torch.equal(got.out, want)
    cpu = page_step(q, k, v, lengths, lo, hi, 3, page_size=8, scale=0.25)
    assert all(torch.equal(a, b) for a, b in zip(cpu, got))


def test_every_page_is_full_attention_and_the_last_page_can_be_forced():
    q, k, v, lengths, lo, hi = _inputs(1, bsz=1, hkv=1, hq=2)
    every = page_step_reference(q, k, v, lengths, lo, hi, 100, page_size=8, scale=0.25)
    assert every.pages.tolist() == [[list(range(7))]]
    p = torch.softmax(q[0] @ k[0, 0].T * 0.25, -1)
    torch.testing.assert_close(every.out[0], p @ v[0, 0], atol=1e-5, rtol=1e-5)
    forced = page_step_reference(
        q, k, v, lengths, lo, hi, 2, page_size=8, scale=0.25, force_last=True
    )
    assert 6 in forced.pages[0, 0].tolist() and forced.pages.shape == (1, 1, 2)


def test_tied_bounds_take_the_lowest_pages():
    q, k, v, lengths, _, _ = _inputs(2, bsz=1, hkv=1, hq=2)
    flat = torch.ones(1, 1, 7, 16)  # every page the same summary: every bound equal
    got = page_step_reference(q, k, v, lengths, flat, flat, 3, page_size=8, scale=0.25)
    assert got.pages.tolist() == [[[0, 1, 2]]]
    forced = page_step_reference(
        q, k, v, lengths, flat, flat, 3, page_size=8, scale=0.25, force_last=True
    )
    assert forced.pages.tolist() == [[[0, 1, 6]]]


@needs_triton
def test_the_fused_launch_refuses_rows_past_the_selections_limit():
    from kvlens_kernels.page_step import page_step_triton

    q = torch.zeros(1, 1, 16)
    big = torch.zeros(1, 1, MAX_PAGES + 1, 16)
    with pytest.raises(ValueError, match="pages per head"):
        page_step_triton(q, q[:, :, None], q[:, :, None], torch.ones(1, 1), big, big, 4,
                         page_size=1, scale=1.0)  # fmt: skip


@needs_triton
def test_launch_b_compiles_for_sm90_with_the_counter_after_a_barrier():
    import re

    from kvlens_kernels.offline_compile import compile_sm90
    from kvlens_kernels.page_step import _page_step_kernel

    pointers = dict.fromkeys(["Q", "K", "V", "OUT"], "fp16")
    pointers |= dict.fromkeys(["LENGTHS", "PAGES", "COUNTERS"], "i32")
    pointers |= dict.fromkeys(["BOUNDS", "O_PART", "L_PART"], "fp32")
    constexprs = dict(
        GROUP=4, GP=4, HEAD_DIM=128, BLOCK_N=64, BLOCK_PAGES=2048, PROBES=4, CHUNK=16,
        IN_PAGE=True, FORCE_LAST=False,
    )  # fmt: skip
    ptx = compile_sm90(_page_step_kernel, pointers, {"scale_log2"}, constexprs, 4, 3).asm["ptx"]
    atom = ptx.index("atom.global.gpu.acq_rel.add")  # release the partials, acquire the others'
    last_store = ptx.rindex("st.global", 0, atom)
    assert "bar.sync" in ptx[last_store:atom]  # every thread's partial written before it
    assert re.search(r"ld\.global\.cg", ptx[atom:])  # the others' partials read past L1
    assert "mma.sync" in ptx  # the attention's products on tensor cores


@needs_triton
def test_kernel_matches_three_launches_and_references_in_the_interpreter():
    assert "ok: 10 cases" in run_check("page_step_check.py")
