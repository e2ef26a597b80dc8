"""The blockwise statistics reference against a naive full-matrix computation."""

from __future__ import annotations

import pytest
import torch

import kvlens_kernels.attention_stats as attention_stats
from kvlens_kernels.attention_stats import attention_stats_reference


def naive(q, k, v, scale, window, sinks, allowed):
    hq, hkv = q.shape[0], k.shape[0]
    kk = k.repeat_interleave(hq // hkv, 0)
    vv = v.repeat_interleave(hq // hkv, 0)
    s = (q @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = s.softmax(-1)
    tk = k.shape[1]
    tq = q.shape[1]
    qpos = torch.arange(tk - tq, tk, dtype=torch.float32)
    kpos = torch.arange(tk, dtype=torch.float32)
    return {
        "out": p @ vv,
        "received": p.sum(1),
        "window": p[:, -window:].sum(1),
        "lse": torch.logsumexp(s, -1),
        "entropy": -(p * torch.log(p.clamp_min(1e-30))).sum(-1),
        "sink_mass": p[..., :sinks].sum(-1),
        "max_prob": p.amax(-1),
        "mean_distance": (p * (qpos[:, None] - kpos[None, :])).sum(-1),
        "local_mass": (p * ((qpos[:, None] - kpos[None, :]) < 3)).sum(-1),
        "probs": p,
    }


def causal(tq, tk, sliding=None):
    qpos = torch.arange(tk - tq, tk)[:, None]
    kpos = torch.arange(tk)[None, :]
    allowed = kpos <= qpos
    if sliding is not None:
        allowed &= kpos > qpos - sliding
    return allowed


@pytest.mark.parametrize(
    "tq, tk, sliding, use_mask",
    [(37, 37, None, False), (5, 40, None, False), (50, 50, 8, False), (33, 33, None, True)],
)
@pytest.mark.parametrize("slab_bytes", [64, 2**20])  # tiny slabs force many query blocks
def test_reference_matches_naive(monkeypatch, tq, tk, sliding, use_mask, slab_bytes):
    monkeypatch.setattr(attention_stats, "SLAB_BYTES", slab_bytes)
    torch.manual_seed(tq + tk)
    q, k, v = torch.randn(6, tq, 16), torch.randn(2, tk, 16), torch.randn(2, tk, 16)
    allowed = causal(tq, tk, sliding)
    out, st = attention_stats_reference(
        q,
        k,
        v,
        scale=0.3,
        window=4,
        sinks=2,
        local=3,
        sliding_window=sliding,
        mask=allowed if use_mask else None,
        want_probs=True,
    )
    want = naive(q, k, v, 0.3, 4, 2, allowed)
    torch.testing.assert_close(out, want["out"], atol=1e-5, rtol=1e-5)
    for name in (
        "received",
        "window",
        "lse",
        "entropy",
        "sink_mass",
        "max_prob",
        "mean_distance",
        "local_mass",
        "probs",
    ):
        torch.testing.assert_close(getattr(st, name), want[name], atol=1e-4, rtol=1e-4, msg=name)


def test_additive_float_mask_equals_bool_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 20, 8), torch.randn(4, 20, 8), torch.randn(4, 20, 8)
    allowed = causal(20, 20, 5)
    additive = torch.zeros(20, 20).masked_fill(~allowed, torch.finfo(torch.float32).min)
    a_out, a = attention_stats_reference(q, k, v, scale=0.5, mask=allowed)
    b_out, b = attention_stats_reference(q, k, v, scale=0.5, mask=additive)
    torch.testing.assert_close(a_out, b_out)
    torch.testing.assert_close(a.received, b.received)
    torch.testing.assert_close(a.entropy, b.entropy)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("tk", [1, 2, 5, 7, 64, 131, 497])  # 1-5: products bmm loops itself
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_decode_reference_is_the_statistics_path_per_head_bit_for_bit(group, tk, softcap):
    """A compressed cache's decoding step used to call the statistics reference once per KV
    head with its causal mask (all True: every stored position is visible); the batched
    decode call must give the same output and attention rows, not merely close ones."""
    torch.manual_seed(tk * group)
    hkv, d = 3, 64
    q = torch.randn(hkv * group, 1, d) * 2
    k, v = torch.randn(hkv, tk, d) * 3, torch.randn(hkv, tk, d)
    out, probs = attention_stats.decode_attention_reference(q, k, v, scale=0.125, softcap=softcap)
    allowed = torch.ones(1, tk, dtype=torch.bool)
    for h in range(hkv):
        rows = slice(h * group, (h + 1) * group)
        want_out, st = attention_stats_reference(
            q[rows], k[h][None], v[h][None], scale=0.125, mask=allowed, softcap=softcap
        )
        assert torch.equal(out[rows], want_out)
        assert torch.equal(probs[rows], st.received)
        assert torch.equal(probs[rows], st.window)


@pytest.mark.parametrize("group, d", [(1, 64), (3, 64), (4, 256), (5, 64), (9, 64)])
@pytest.mark.parametrize("tk", [1, 3, 64, 497])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_decode_probs_is_the_whole_layer_reference_bit_for_bit(group, d, tk, softcap):
    """A probe's recorded row (the last query over every key, all KV heads in one call):
    ``decode_probs`` gives the reference's ``received`` exactly at every shape, for the
    prompt's last query as for a decoding step's."""
    torch.manual_seed(tk + group)
    hkv = 3
    q = torch.randn(hkv * group, 5, d) * 2
    k, v = torch.randn(hkv, tk + 4, d) * 3, torch.randn(hkv, tk + 4, d)
    for query, keys, values in ((q[:, -1:], k[:, :tk], v[:, :tk]), (q, k, v)):
        if query.shape[1] > keys.shape[1]:
            continue
        _, st = attention_stats_reference(
            query[:, -1:], keys, values, scale=0.125, window=1, softcap=softcap
        )
        got = attention_stats.decode_probs(query[:, -1:], keys, scale=0.125, softcap=softcap)
        assert torch.equal(got, st.received)


@pytest.mark.parametrize("slab_bytes", [64, 2**21])
@pytest.mark.parametrize("sliding", [None, 8])
def test_without_row_statistics_the_columns_and_output_are_unchanged(
    monkeypatch, slab_bytes, sliding
):
    """``per_row=False`` (a compressed cache's prefill) skips lse .. local_mass and leaves
    the output, received and window exactly as with them."""
    monkeypatch.setattr(attention_stats, "SLAB_BYTES", slab_bytes)
    torch.manual_seed(3)
    q, k, v = torch.randn(9, 60, 64), torch.randn(3, 60, 64), torch.randn(3, 60, 64)
    kw = {"scale": 0.125, "window": 7, "sliding_window": sliding}
    out, st = attention_stats_reference(q, k, v, **kw)
    lean_out, lean = attention_stats.attention_with_stats(q, k, v, per_row=False, **kw)
    assert torch.equal(lean_out, out)
    assert torch.equal(lean.received, st.received)
    assert torch.equal(lean.window, st.window)
    assert lean.lse is None and lean.local_mass is None and st.lse is not None
