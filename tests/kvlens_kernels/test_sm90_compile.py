"""The Triton kernels compiled for an H100 (sm_90) on this CPU-only machine, with the ptxas
that ships in Triton's wheel: GPU-only compile errors show up in CI, and the compiled code
keeps the properties the measured speed rests on (benchmarks/RESULTS.md)."""

from __future__ import annotations

import re

import pytest

from tests.kvlens_kernels.interpreter import needs_triton

pytestmark = needs_triton


def _compile_sm90(*args, **kwargs) -> str:
    from kvlens_kernels.offline_compile import compile_sm90

    return compile_sm90(*args, **kwargs).asm["ptx"]


@pytest.mark.parametrize(
    "bits,warps,res_stages,overlap", [(2, 1, 1, True), (2, 1, 1, False), (4, 2, 2, False)]
)
def test_quantised_decode_reads_codes_as_words_and_unpacks_with_one_and(
    bits, warps, res_stages, overlap
):
    from kvlens_kernels.offline_compile import compile_quant_decode_sm90

    ptx = compile_quant_decode_sm90(bits, warps, res_stages, overlap=overlap).asm["ptx"]
    # the codes reach registers in 16-bit or wider loads: the byte layout this replaced was
    # read with 64 single-byte shared loads per tile, the cost its profile showed
    assert not re.findall(r"ld\.shared(?:\.v\d)?\.(?:u8|s8|b8)", ptx)
    # one and per two codes (float16 subnormals, no conversion): 64 x 128 codes of keys and of
    # values per tile (the loop body appears once per software-pipelined copy, so count at
    # least one tile); the earlier lop3 + fma unpacking is gone
    per_tile = 2 * 64 * 128 // 2 // (32 * warps)
    assert len(re.findall(r"and\.b32 %r\d+, %r\d+, 0x", ptx)) >= per_tile
    assert "fma.rn.f16x2" not in ptx
    assert "mma.sync" in ptx  # products on tensor cores
    assert "cp.async" in ptx  # tiles stream into shared memory asynchronously (pipelined)


def test_main_loop_mix_counts_the_tile_loop_of_the_quantised_kernel():
    from kvlens_kernels.offline_compile import compile_quant_decode_sm90, main_loop_mix

    kernel = compile_quant_decode_sm90(4, 2, 2)
    regs, ops = main_loop_mix(kernel)
    assert 0 < regs <= 255
    # one iteration unpacks 64 tokens x 128 channels of keys and of values over 64 threads:
    # 256 codes a thread, one AND (a LOP3) per two, no float16 fma
    assert ops["LOP3.LUT"] >= 128 and ops["HFMA2"] == 0
    assert any(op.startswith("HMMA") for op in ops)


def test_statistics_pass_compiles_for_sm90_with_wgmma():
    from kvlens_kernels.attention_stats_triton import _stats_from_lse

    pointers = {"Q": "bf16", "K": "bf16"}
    pointers |= dict.fromkeys(["LSE2", "RECEIVED", "WINDOW", "ENT", "SINK", "MAXP"], "fp32")
    pointers |= dict.fromkeys(["DIST", "LOCAL"], "fp32")
    constexprs = dict(GROUP=4, SINKS=4, LOCAL_W=16, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=64)
    constexprs["DOT"] = "tf32"  # what the launcher passes for 16-bit inputs (dot_precision)
    divisible = {"stride_qh", "stride_qt", "stride_kh", "stride_kt", "T_Q", "T_K"}
    ptx = _compile_sm90(_stats_from_lse, pointers, {"scale_log2"}, constexprs, 4, 3, divisible)
    assert "wgmma.mma_async" in ptx  # the transposed scores run on Hopper's warpgroup MMA
    assert "red.global" in ptx or "atom.global" in ptx  # column sums added atomically


def test_statistics_pass_multiplies_float32_in_float32_for_sm90():
    """Float32 inputs ask for IEEE products: no TF32 tensor-core product in the kernel."""
    from kvlens_kernels.attention_stats_triton import _stats_from_lse

    pointers = dict.fromkeys(["Q", "K", "LSE2", "RECEIVED", "WINDOW", "ENT", "SINK"], "fp32")
    pointers |= dict.fromkeys(["MAXP", "DIST", "LOCAL"], "fp32")
    constexprs = dict(GROUP=4, SINKS=4, LOCAL_W=16, HEAD_DIM=128, BLOCK_M=64, BLOCK_N=32)
    constexprs["DOT"] = "ieee"
    divisible = {"stride_qh", "stride_qt", "stride_kh", "stride_kt", "T_Q", "T_K"}
    ptx = _compile_sm90(_stats_from_lse, pointers, {"scale_log2"}, constexprs, 4, 2, divisible)
    assert "tf32" not in ptx and "wgmma" not in ptx
    assert "fma.rn.f32" in ptx


def test_sparse_decode_compiles_for_sm90():
    from kvlens_kernels.sparse_decode import _sparse_decode_split

    pointers = {"Q": "fp16", "K": "fp16", "V": "fp16", "LENGTHS": "i32"}
    pointers |= {"O_PART": "fp32", "L_PART": "fp32"}
    constexprs = dict(GROUP=4, GP=4, HEAD_DIM=128, BLOCK_N=64)
    divisible = {"stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kc"}
    divisible |= {"stride_vb", "stride_vh", "stride_vc", "SPLIT_LEN"}
    ptx = _compile_sm90(_sparse_decode_split, pointers, {"scale_log2"}, constexprs, 4, 3, divisible)
    assert "mma.sync" in ptx
