"""On CUDA: the Triton statistics kernels against the PyTorch reference and against eager
probabilities, for head dims 64/128/256, bf16 and fp16, 1k-4k tokens; and the probe on a
small random Llama model gives the same statistics on the GPU as on the CPU."""

from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROW_STATS = ("lse", "entropy", "sink_mass", "max_prob", "mean_distance", "local_mass")


def _inputs(hq, hkv, t, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(h, t, d, device="cuda", dtype=dtype, generator=g) for h in (hq, hkv, hkv)]


def _eager(q, k, v, scale, window, sinks, local):
    group = q.shape[0] // k.shape[0]
    kk, vv = k.float().repeat_interleave(group, 0), v.float().repeat_interleave(group, 0)
    t = q.shape[1]
    s = (q.float() @ kk.transpose(1, 2)) * scale
    causal = torch.ones(t, t, device=q.device, dtype=torch.bool).tril()
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    pos = torch.arange(t, device=q.device, dtype=torch.float32)
    dist = pos[:, None] - pos[None, :]
    return p @ vv, {
        "received": p.sum(1),
        "window": p[:, -window:].sum(1),
        "entropy": -(p * p.clamp_min(1e-30).log()).sum(-1),
        "sink_mass": p[..., :sinks].sum(-1),
        "max_prob": p.amax(-1),
        "mean_distance": (p * dist).sum(-1),
        "local_mass": (p * ((dist < local) & causal)).sum(-1),
    }


@pytest.mark.parametrize("impl", ["two-pass", "sdpa-lse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("t", [1024, 4096])
def test_kernels_match_reference_and_eager(t, d, dtype, impl):
    from kvlens_kernels.attention_stats import attention_stats_reference
    from kvlens_kernels.attention_stats_triton import attention_stats_fast, attention_stats_triton

    q, k, v = _inputs(8, 2, t, d, dtype, seed=t + d)
    kw = {"scale": d**-0.5, "window": 32, "sinks": 4, "local": 16}
    if impl == "two-pass":
        out, st = attention_stats_triton(q, k, v, **kw)
    else:
        out, st = attention_stats_fast(q, k, v, lse_source="sdpa" if d <= 128 else "auto", **kw)
    ref_out, ref = attention_stats_reference(q, k, v, **kw)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    for name in ROW_STATS + ("received", "window"):
        a, b = getattr(st, name), getattr(ref, name)
        torch.testing.assert_close(a, b, atol=5e-3, rtol=5e-3, msg=name)
    eager_out, eager = _eager(q, k, v, **kw)
    for name, want in eager.items():
        torch.testing.assert_close(
            getattr(st, name), want, atol=5e-3, rtol=5e-3, msg=f"eager {name}"
        )
    # the mass every query head distributes sums to the number of queries
    torch.testing.assert_close(
        st.received.sum(-1), torch.full((8,), float(t), device="cuda"), rtol=1e-3, atol=0
    )


def test_sliding_window_and_offset_queries():
    from kvlens_kernels.attention_stats import attention_stats_reference
    from kvlens_kernels.attention_stats_triton import attention_stats_fast, attention_stats_triton

    q, k, v = _inputs(4, 1, 700, 128, torch.bfloat16)
    k2, v2 = _inputs(4, 1, 1500, 128, torch.bfloat16, seed=3)[1:]
    cases = [({"sliding_window": 256}, (k, v)), ({}, (k2, v2))]
    # the two passes, and the dispatched path (no SDPA LSE for these: it falls back)
    for impl, (kw, (kk, vv)) in itertools.product(
        (attention_stats_triton, attention_stats_fast), cases
    ):
        out, st = impl(q, kk, vv, scale=128**-0.5, **kw)
        ref_out, ref = attention_stats_reference(q, kk, vv, scale=128**-0.5, **kw)
        torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
        for name in ROW_STATS + ("received", "window"):
            torch.testing.assert_close(
                getattr(st, name), getattr(ref, name), atol=5e-3, rtol=5e-3, msg=name
            )


def test_probe_on_gpu_equals_probe_on_cpu():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: F401

    from probes.attention import install_key_hooks, register_kvlens_attention
    from probes.capture import capture

    register_kvlens_attention()
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=4096,
    )
    cfg._attn_implementation = "kvlens"
    torch.manual_seed(0)
    cpu = LlamaForCausalLM(cfg).eval()
    gpu = LlamaForCausalLM(cfg).eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to("cuda", torch.bfloat16)
    cpu = cpu.to(torch.bfloat16).float()  # same rounded weights on both
    for m in (cpu, gpu):
        install_key_hooks(m)
    ids = torch.randint(0, 1000, (1500,)).tolist()
    a = capture(cpu, None, ids, attention="stats", kv=False)
    b = capture(gpu, None, ids, attention="stats", kv=False)
    ka, kb = (
        a.key_stats.sort("layer", "head", "position"),
        b.key_stats.sort("layer", "head", "position"),
    )
    diff = (ka["received"] - kb["received"]).abs().max()
    assert diff < 0.05 * max(1.0, ka["received"].max()), diff
    qa, qb = (
        a.query_stats.sort("layer", "head", "position"),
        b.query_stats.sort("layer", "head", "position"),
    )
    assert (qa["entropy"] - qb["entropy"]).abs().max() < 0.05


@pytest.mark.parametrize("d", [64, 128])
def test_float32_through_the_dispatcher_matches_reference(d):
    """A float32 model on the GPU (the CPU's dtype) takes the dispatched path too: its output
    and statistics are finite and equal the reference."""
    from kvlens_kernels.attention_stats import attention_stats_reference, attention_with_stats

    q, k, v = _inputs(9, 3, 1024, d, torch.float32, seed=d)
    kw = {"scale": d**-0.5, "window": 32}
    out, st = attention_with_stats(q, k, v, **kw)
    ref_out, ref = attention_stats_reference(q, k, v, **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, atol=1e-2, rtol=1e-2)
    for name in ROW_STATS + ("received", "window"):
        torch.testing.assert_close(getattr(st, name), getattr(ref, name), atol=5e-3, rtol=5e-3)
