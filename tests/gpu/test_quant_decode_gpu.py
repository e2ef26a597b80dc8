"""On CUDA: quantise-and-pack and quantised decode (KIVI layout) against their references and
against dequantise-then-SDPA, at several lengths, group sizes and bit widths, batch 1 and 8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _quant_cache(bsz, hkv, n, r, d, group, bits, per_channel, dtype, seed):
    from kvlens_kernels.quant_decode import QuantKV
    from kvlens_kernels.quantize import quantize_groups_triton

    g = torch.Generator(device="cuda").manual_seed(seed)
    keys = torch.randn(bsz * hkv, n, d, device="cuda", dtype=dtype, generator=g)
    keys[..., :4] *= 8  # outlier channels, as real keys have
    values = torch.randn(bsz * hkv, n, d, device="cuda", dtype=dtype, generator=g)
    blocks = quantize_groups_triton(
        keys, values, key_bits=bits, value_bits=bits, group=group, key_per_channel=per_channel
    )
    res = [torch.randn(bsz, hkv, r, d, device="cuda", dtype=dtype, generator=g) for _ in "kv"]
    cache = QuantKV.from_blocks(
        blocks, *res, key_bits=bits, value_bits=bits, group=group, key_per_channel=per_channel
    )
    return cache, keys, values


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_kernel_gives_the_reference_codes(bits, per_channel):
    from kvlens_kernels.quantize import quantize_groups_reference, quantize_groups_triton

    g = torch.Generator(device="cuda").manual_seed(bits)
    keys = torch.randn(8, 4096, 128, device="cuda", dtype=torch.float16, generator=g)
    values = torch.randn(8, 4096, 128, device="cuda", dtype=torch.float16, generator=g)
    args = dict(key_bits=bits, value_bits=bits, group=128, key_per_channel=per_channel)
    got, want = (
        quantize_groups_triton(keys, values, **args),
        quantize_groups_reference(keys, values, **args),
    )
    for name in ("key_scale", "key_zero", "value_scale", "value_zero"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("key_codes", "value_codes"):  # IEEE division on both sides: the same bytes
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a, b), (name, (a != b).float().mean().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "bsz,n,group,bits,per_channel",
    [
        (1, 1024, 32, 2, True),
        (1, 8192, 128, 4, True),
        (8, 8192, 128, 2, True),
        (8, 1024, 64, 4, True),
        (1, 4096, 32, 8, False),
    ],
)
def test_quant_decode_matches_reference_and_sdpa(dtype, bsz, n, group, bits, per_channel):
    from kvlens_kernels.quant_decode import (
        dequantize_cache,
        quant_decode_reference,
        quant_decode_triton,
    )

    cache, _, _ = _quant_cache(bsz, 8, n, 100, 128, group, bits, per_channel, dtype, n + bits)
    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(bsz, 32, 128, device="cuda", dtype=dtype, generator=g)
    got = quant_decode_triton(q, cache, scale=128**-0.5).float()
    want = quant_decode_reference(q, cache, scale=128**-0.5).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    k, v = dequantize_cache(cache, dtype)
    sdpa = F.scaled_dot_product_attention(q[:, :, None], k, v, scale=128**-0.5, enable_gqa=True)[
        :, :, 0
    ].float()
    torch.testing.assert_close(got, sdpa, atol=tol, rtol=tol)


@pytest.mark.parametrize("overlap,per_group", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("bsz,bits,block_n", [(1, 2, 64), (8, 4, 32), (2, 8, 64)])
def test_every_loop_schedule_matches_the_reference(overlap, per_group, bsz, bits, block_n):
    from kvlens_kernels.quant_decode import quant_decode_reference, quant_decode_triton

    # 3968 coded tokens in 16 splits (the last one short) and a 32-token residual in a split of
    # its own, which has no tile of codes: the skewed loop's prologue must not read past them
    cache, _, _ = _quant_cache(bsz, 8, 3968, 32, 128, 128, bits, True, torch.float16, bits)
    g = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(bsz, 32, 128, device="cuda", dtype=torch.float16, generator=g)
    got = quant_decode_triton(
        q, cache, scale=128**-0.5, block_n=block_n, overlap=overlap, fold_per_group=per_group
    )
    want = quant_decode_reference(q, cache, scale=128**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=4e-3, rtol=4e-3)
