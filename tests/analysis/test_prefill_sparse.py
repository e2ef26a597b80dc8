"""Prefill-side sparse attention (XAttention, MInference vertical-slash, PSA) against float64
numpy written out entry by entry, and on SmolLM2's real queries, keys and values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.prefill_sparse import (
    DROPPED,
    PSA,
    VerticalSlash,
    XAttention,
    antidiagonal_scores,
    blocks_to_mask,
    causal_probs,
    evaluate,
    layer_table,
    masked_attention,
    psa_levels,
    pyramid_attention,
    strided_scores,
    summary,
    vertical_slash_mask,
    xattention_blocks,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _qkv(seed: int, hq: int = 4, hkv: int = 2, t: int = 37, d: int = 8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, t, d, generator=gen, dtype=torch.float64) * 1.5
    k = torch.randn(hkv, t, d, generator=gen, dtype=torch.float64)
    v = torch.randn(hkv, t, d, generator=gen, dtype=torch.float64)
    return q, k, v


def _np_probs(q, k, scale):
    """Causal softmax per head, written out per row, float64 numpy."""
    q, k = q.numpy(), k.numpy()
    hq, t, _ = q.shape
    group = hq // k.shape[0]
    p = np.zeros((hq, t, t))
    for h in range(hq):
        for i in range(t):
            s = k[h // group, : i + 1] @ q[h, i] * scale
            e = np.exp(s - s.max())
            p[h, i, : i + 1] = e / e.sum()
    return p


def _np_attend(q, keys, values, scale, bias=None):
    s = keys @ q * scale + (0 if bias is None else bias)
    e = np.exp(s - s.max())
    return (e / e.sum()) @ values


def test_causal_probs_and_full_masks_are_full_attention_with_recall_one():
    q, k, v = _qkv(0)
    scale = 0.4
    p = causal_probs(q, k, scale)
    np.testing.assert_allclose(p.numpy(), _np_probs(q, k, scale), atol=1e-12)
    full = p @ v.repeat_interleave(2, 0)
    for method in (
        XAttention(block=8, stride=4, threshold=1.0),
        VerticalSlash(last_q=5, vertical=37, slash=1),
        VerticalSlash(last_q=5, vertical=1, slash=37),
        PSA(block=8, stride=4, thresholds=(1.0,)),
    ):
        got = evaluate(q, k, v, scale, method)
        np.testing.assert_allclose(got["density"].numpy(), 1.0, atol=1e-12)
        np.testing.assert_allclose(got["recall"].numpy(), 1.0, atol=1e-12)
        np.testing.assert_allclose(got["min_recall"].numpy(), 1.0, atol=1e-12)
        np.testing.assert_allclose(got["output_error"].numpy(), 0.0, atol=1e-12)
    every = torch.ones(4, 37, 37, dtype=torch.bool).tril()
    assert torch.equal(masked_attention(q, k, v, every, scale), full)


def test_antidiagonal_block_scores_equal_a_hand_loop():
    q, k, _ = _qkv(1, t=45)
    p = causal_probs(q, k, 0.3)
    block, stride = 12, 4
    got = antidiagonal_scores(p, block, stride).numpy()
    pn = p.numpy()
    nb = math.ceil(45 / block)
    want = np.zeros((4, nb, nb))
    for h in range(4):
        for i in range(45):
            for j in range(45):
                if (i + j) % stride == stride - 1:
                    want[h, i // block, j // block] += pn[h, i, j]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_strided_estimate_equals_a_hand_loop_over_antidiagonal_logits():
    q, k, _ = _qkv(8, t=45)
    block, stride, scale = 12, 4, 0.3
    got = strided_scores(q, k, scale, block, stride).numpy()
    n = 48  # padded to whole blocks with zero vectors
    qn = np.zeros((4, n, 8))
    kn = np.zeros((2, n, 8))
    qn[:, :45], kn[:, :45] = q.numpy(), k.numpy()
    m = n // stride
    want = np.zeros((4, 4, 4))
    for h in range(4):
        for a in range(m):
            if a * stride >= 45:
                continue
            logits = np.array(
                [
                    sum(
                        qn[h, stride * a + stride - 1 - r] @ kn[h // 2, stride * b + r]
                        for r in range(stride)
                    )
                    * scale
                    / stride
                    for b in range(a + 1)
                ]
            )
            e = np.exp(logits - logits.max())
            for b, pb in enumerate(e / e.sum()):
                want[h, a * stride // block, b * stride // block] += pb
    np.testing.assert_allclose(got, want, atol=1e-12)
    # strided scoring runs end to end and keeps a valid causal block set with the diagonal
    cfg = XAttention(block=12, stride=4, threshold=0.7, scoring="strided")
    res = evaluate(q, k, _qkv(8, t=45)[2], scale, cfg)
    assert ((res["density"] > 0) & (res["density"] <= 1)).all()
    blocks = xattention_blocks(causal_probs(q, k, scale), cfg, q, k, scale)
    assert blocks[:, range(4), range(4)].all() and not blocks.triu(1).any()
    # keep_sink adds the first key block to every query block and nothing else
    sink = XAttention(block=12, stride=4, threshold=0.7, scoring="strided", keep_sink=True)
    with_sink = xattention_blocks(causal_probs(q, k, scale), sink, q, k, scale)
    assert with_sink[:, :, 0].all() and torch.equal(with_sink[:, :, 1:], blocks[:, :, 1:])
    lv = psa_levels(
        causal_probs(q, k, scale), PSA(block=12, stride=4, thresholds=(0.3, 0.6), keep_sink=True)
    )
    assert (lv[:, :, 0] == 0).all()


def test_xattention_keeps_the_smallest_prefix_of_ranked_blocks_reaching_the_threshold():
    q, k, _ = _qkv(2, t=64)
    p = causal_probs(q, k, 0.5)
    cfg = XAttention(block=8, stride=4, threshold=0.8)
    got = xattention_blocks(p, cfg).numpy()
    scores = antidiagonal_scores(p, 8, 4).numpy()
    for h in range(4):
        for qi in range(8):
            s = scores[h, qi, : qi + 1] / scores[h, qi, : qi + 1].sum()
            order = np.argsort(-s, kind="stable")
            want = np.zeros(8, bool)
            total = 0.0
            for j in order:
                if total >= 0.8:
                    break
                want[j] = True
                total += s[j]
            want[qi] = True  # the diagonal block is always kept
            assert (got[h, qi] == want).all(), (h, qi)
    # a lower threshold keeps a subset of the blocks
    fewer = xattention_blocks(p, XAttention(block=8, stride=4, threshold=0.5)).numpy()
    assert (fewer <= got).all() and fewer.sum() < got.sum()


def test_masked_attention_recall_and_density_match_numpy_on_a_block_mask():
    q, k, v = _qkv(3, t=40)
    scale = 0.35
    cfg = XAttention(block=8, stride=4, threshold=0.6)
    got = evaluate(q, k, v, scale, cfg)
    p = causal_probs(q, k, scale)
    blocks = xattention_blocks(p, cfg).numpy()
    pn, qn, kn, vn = _np_probs(q, k, scale), q.numpy(), k.numpy(), v.numpy()
    for h in range(4):
        kept = np.array(
            [[blocks[h, i // 8, j // 8] and j <= i for j in range(40)] for i in range(40)]
        )
        out = np.stack(
            [
                _np_attend(qn[h, i], kn[h // 2][kept[i]], vn[h // 2][kept[i]], scale)
                for i in range(40)
            ]
        )
        full = pn[h] @ vn[h // 2]
        mass = (pn[h] * kept).sum(-1)
        assert float(got["density"][h]) == pytest.approx(kept.sum() / (40 * 41 / 2), abs=1e-12)
        assert float(got["recall"][h]) == pytest.approx(mass.mean(), abs=1e-12)
        assert float(got["min_recall"][h]) == pytest.approx(mass.min(), abs=1e-12)
        err = np.linalg.norm(out - full) / np.linalg.norm(full)
        assert float(got["output_error"][h]) == pytest.approx(err, abs=1e-10)
    assert (got["density"] < 1).all() and (got["recall"] < 1).all()


def _planted_probs(t: int = 48, column: int = 11, offset: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(4)
    raw = torch.rand(2, t, t, generator=gen, dtype=torch.float64) * 0.01
    i = torch.arange(t)
    raw[:, :, column] += 1.0
    raw[:, i[offset:], i[offset:] - offset] += 1.0
    raw = raw * torch.ones(t, t, dtype=torch.bool).tril()
    return raw / raw.sum(-1, keepdim=True)


def test_vertical_slash_picks_the_planted_column_and_diagonal():
    t, column, offset = 48, 11, 5
    p = _planted_probs(t, column, offset)
    mask = vertical_slash_mask(p, VerticalSlash(last_q=16, vertical=2, slash=2)).numpy()
    want = np.zeros((t, t), bool)
    for i in range(t):
        for j in range(i + 1):
            want[i, j] = j in (0, column) or (i - j) in (0, offset)
    for h in range(2):
        assert (mask[h] == want).all()


def test_pyramid_attention_pools_blocks_as_written_out():
    q, k, v = _qkv(5, hq=2, hkv=1, t=30)
    scale, block = 0.45, 8
    nb = 4
    gen = torch.Generator().manual_seed(9)
    levels = torch.randint(-1, 4, (2, nb, nb), generator=gen)
    levels = levels.masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), DROPPED)
    levels[:, range(nb), range(nb)] = 0
    got = pyramid_attention(q, k, v, levels, block, scale).numpy()
    qn, kn, vn = q.numpy(), k[0].numpy(), v[0].numpy()
    for h in range(2):
        for i in range(30):
            keys, vals, bias = [], [], []
            for jb in range(i // block + 1):
                lvl = int(levels[h, i // block, jb])
                if jb == i // block:
                    for j in range(jb * block, i + 1):
                        keys.append(kn[j]), vals.append(vn[j]), bias.append(0.0)
                    continue
                if lvl < 0:
                    continue
                m = 2**lvl
                for g in range(jb * block, min((jb + 1) * block, 30), m):
                    idx = list(range(g, min(g + m, 30)))
                    keys.append(kn[idx].mean(0)), vals.append(vn[idx].mean(0))
                    bias.append(math.log(len(idx)))
            want = _np_attend(qn[h, i], np.array(keys), np.array(vals), scale, np.array(bias))
            np.testing.assert_allclose(got[h, i], want, atol=1e-12)


def test_pyramid_at_level_zero_is_the_block_mask_and_psa_counts_pooled_density():
    q, k, v = _qkv(6, t=40)
    scale = 0.4
    p = causal_probs(q, k, scale)
    blocks = xattention_blocks(p, XAttention(block=8, stride=4, threshold=0.6))
    levels = torch.where(blocks, 0, DROPPED)
    a = pyramid_attention(q, k, v, levels, 8, scale)
    b = masked_attention(q, k, v, blocks_to_mask(blocks, 40, 8), scale)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-12)
    # PSA with one level is XAttention at that threshold
    one = evaluate(q, k, v, scale, PSA(block=8, stride=4, thresholds=(0.6,)))
    xa = evaluate(q, k, v, scale, XAttention(block=8, stride=4, threshold=0.6))
    for name in one:
        np.testing.assert_allclose(one[name].numpy(), xa[name].numpy(), atol=1e-12)
    # a second level pools more blocks at half cost: more mass covered, density counted by level
    cfg = PSA(block=8, stride=4, thresholds=(0.6, 0.9))
    lv = psa_levels(p, cfg).numpy()
    two = evaluate(q, k, v, scale, cfg)
    for h in range(4):
        cost = sum(
            (min(40, (ib + 1) * 8) - ib * 8) * 8 * 0.5 ** lv[h, ib, jb]
            for ib in range(5)
            for jb in range(ib)
            if lv[h, ib, jb] >= 0
        ) + sum((n := min(40, (ib + 1) * 8) - ib * 8) * (n + 1) / 2 for ib in range(5))
        assert float(two["density"][h]) == pytest.approx(cost / (40 * 41 / 2), abs=1e-12)
    assert (two["recall"] >= one["recall"] - 1e-12).all()
    assert two["output_error"].mean() < one["output_error"].mean()


def test_layer_table_and_summary():
    q, k, v = _qkv(7, t=33)
    methods = [
        XAttention(block=8, stride=4, threshold=0.7),
        VerticalSlash(last_q=8, vertical=4, slash=4),
    ]
    table = layer_table({0: (q, k, v), 3: (q, k, v)}, 0.4, methods)
    assert table.height == 2 * 2 * 4 and set(table["layer"]) == {0, 3}
    s = summary(table)
    assert s.height == 2 and set(s["method"]) == {"xattention", "vertical_slash"}
    assert ((s["density"] > 0) & (s["density"] < 1)).all()


def test_on_smollm2_real_queries_keys_and_values(smol):
    from probes.attention import attention_modules
    from probes.queries import capture_qkv
    from tests.conftest import passage

    model, tok = smol
    layers = [0, 14]
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for attn in attention_modules(model):
        if attn.layer_idx in layers:

            def grab(_m, inp, layer=attn.layer_idx):
                seen[layer] = inp[0][0].detach().float().clone()

            hooks.append(attn.o_proj.register_forward_pre_hook(grab))
    try:
        qkv = capture_qkv(model, tok, passage(3), layers=layers)
    finally:
        for hk in hooks:
            hk.remove()
    t = qkv.trace.n_tokens
    assert qkv.layers == layers and t > 150
    for layer in layers:
        q, k, v = qkv.queries[layer].double(), qkv.keys[layer].double(), qkv.values[layer].double()
        assert q.shape == (9, t, 64) and k.shape == (3, t, 64)
        # the recorded queries reproduce the model's own attention output (o_proj's input)
        out = causal_probs(q, k, qkv.scale) @ v.repeat_interleave(3, 0)
        model_out = seen[layer].reshape(t, 9, 64).transpose(0, 1).double()
        assert float((out - model_out).norm() / model_out.norm()) < 1e-4
    tab = summary(
        layer_table(
            {layer: (qkv.queries[layer], qkv.keys[layer], qkv.values[layer]) for layer in layers},
            qkv.scale,
            [
                XAttention(block=16, stride=8, threshold=0.5),
                XAttention(block=16, stride=8, threshold=0.95),
                VerticalSlash(last_q=32, vertical=16, slash=16),
                PSA(block=16, stride=8, thresholds=(0.5, 0.7, 0.9, 0.95)),
            ],
        )
    )
    rows = {r["config"]: r for r in tab.iter_rows(named=True)}
    lo, hi = (
        rows["xattention:block=16,stride=8,threshold=0.5"],
        rows["xattention:block=16,stride=8,threshold=0.95"],
    )
    assert lo["density"] < hi["density"] < 1 and lo["recall"] < hi["recall"]
    assert hi["recall"] > 0.9 and hi["output_error"] < lo["output_error"]
    for r in rows.values():
        assert 0 < r["density"] < 1 and 0 < r["recall"] <= 1 + 1e-9
    print(tab)
