"""On CUDA: compressed caches decode through the Triton kernels inside the model (KIVI through
quantised decode, SnapKV and StreamingLLM through sparse decode) with the same logits as the
statistics path, on a small random Llama in float16."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from probes.attention import register_kvlens_attention

    register_kvlens_attention()
    # head_dim 128: the quantised kernel needs channel blocks of D * bits / 16 >= 16 (int2)
    cfg = LlamaConfig(
        hidden_size=1024, intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=2000, max_position_embeddings=4096,
    )  # fmt: skip
    cfg._attn_implementation = "kvlens"
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.float16).eval()


@pytest.mark.parametrize(
    "spec",
    [
        "kivi:bits=2,group=32,residual=32",
        "kivi:bits=4,group=64,residual=64",
        "int8",
        "snapkv:budget=200,window=16",
        "streamingllm:budget=300,sinks=4",
    ],
)
def test_kernel_decode_matches_the_statistics_path(llama, spec):
    from methods.cache import CompressedCache
    from methods.evaluate import prefill_logits, teacher_forced
    from methods.registry import create

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 2000, (1500,), generator=g).tolist()
    follow = torch.randint(0, 2000, (40,), generator=g).tolist()
    runs = []
    for kernels in (True, False):
        cache = CompressedCache(llama, create(spec))
        for layer in cache.layers:
            layer.use_decode_kernels = kernels
        with torch.inference_mode():
            first = prefill_logits(llama, ids, cache)
            logits = teacher_forced(llama, first, cache, follow)
        assert cache.layers[0].decodes_from_store() == kernels
        runs.append((torch.stack(logits), cache))
    (fast, cf), (slow, cs) = runs
    if hasattr(cf.layers[0].store, "layout"):  # quantised: the Triton kernel, not the reference
        from kvlens_kernels.quant_decode import kernel_applies

        q = torch.empty(1, 8, 128, device="cuda", dtype=torch.float16)
        assert kernel_applies(q, cf.layers[0].store.layout())
    torch.testing.assert_close(fast, slow, atol=2e-2, rtol=2e-2)
    assert cf.nbytes() == cs.nbytes()
    for layer in range(3):
        for a, b in zip(cf.kept_positions(layer), cs.kept_positions(layer), strict=True):
            assert torch.equal(a, b)
