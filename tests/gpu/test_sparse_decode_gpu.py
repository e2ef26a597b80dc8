"""On CUDA: sparse decode against its reference and against dense SDPA over the kept rows."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("bsz", [1, 8])
@pytest.mark.parametrize("cap", [1000, 8192])
def test_sparse_decode_matches_reference(bsz, cap):
    from kvlens_kernels.sparse_decode import sparse_decode_reference, sparse_decode_triton

    g = torch.Generator(device="cuda").manual_seed(cap + bsz)
    q = torch.randn(bsz, 32, 128, device="cuda", dtype=torch.float16, generator=g)
    k = torch.randn(bsz, 8, cap, 128, device="cuda", dtype=torch.float16, generator=g)
    v = torch.randn(bsz, 8, cap, 128, device="cuda", dtype=torch.float16, generator=g)
    lengths = torch.randint(1, cap + 1, (bsz, 8), device="cuda", generator=g)
    got = sparse_decode_triton(q, k, v, lengths, scale=128**-0.5)
    want = sparse_decode_reference(q, k, v, lengths, scale=128**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse_decode_matches_sdpa_over_the_kept_rows(dtype):
    import torch.nn.functional as F

    from kvlens_kernels.sparse_decode import sparse_decode

    g = torch.Generator(device="cuda").manual_seed(3)
    cap, kept = 4096, [410, 1024, 3000, 4096, 1, 77, 2048, 999]
    q = torch.randn(1, 32, 128, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, 8, cap, 128, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, 8, cap, 128, device="cuda", dtype=dtype, generator=g)
    got = sparse_decode(q, k, v, torch.tensor([kept], device="cuda"), scale=0.1).float()
    for h, n in enumerate(kept):
        want = F.scaled_dot_product_attention(
            q[:, 4 * h : 4 * h + 4, None],
            k[:, h : h + 1, :n],
            v[:, h : h + 1, :n],
            scale=0.1,
            enable_gqa=True,
        )[:, :, 0].float()
        torch.testing.assert_close(got[:, 4 * h : 4 * h + 4], want, atol=1e-2, rtol=1e-2)
