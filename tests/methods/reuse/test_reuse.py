"""Chunk-cache reuse on the real SmolLM2 (CPU): exactness of placement and of the recompute
extremes, CacheBlend's selection against an independent deviation, Cache-Craft's and KVCOMM's
rules on cases whose answer is known."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from methods.reuse import create_reuse
from methods.reuse.base import Context, Layout
from methods.reuse.cacheblend import CacheBlend, select_hkvd
from methods.reuse.cachecraft import CacheCraft, prefix_overlap
from methods.reuse.chunks import place, prefill_chunk
from methods.reuse.kvcomm import KVComm, anchor_orders
from methods.reuse.naive import NaiveReuse
from methods.reuse.rotary import Rotary
from probes.compat import cache_arg
from probes.errors import KvlensError

TEXTS = [
    "The lighthouse keeper wrote in his log every evening.",
    " On Monday the sea was calm and three boats returned.",
    " His daughter Mira painted the door blue that spring.",
]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def layout(smol):
    _, tok = smol
    return Layout(
        _ids(tok, "Read the notes.\n"), [_ids(tok, t) for t in TEXTS], _ids(tok, " Who painted?")
    )


@pytest.fixture(scope="module")
def full(smol, layout):
    """Full prefill with transformers' own cache: next-token logits and per-layer K/V."""
    model, _ = smol
    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([layout.ids]), **cache_arg(model, cache), use_cache=True)
    n = layout.n_context
    keys = [cache.layers[i].keys[0, :, :n] for i in range(len(cache.layers))]
    values = [cache.layers[i].values[0, :, :n] for i in range(len(cache.layers))]
    return out.logits[0, -1].float(), keys, values


def test_single_chunk_at_zero_is_a_normal_prefill(smol, layout):
    model, _ = smol
    chunk = layout.chunks[0]
    lay = Layout([], [chunk], layout.question)
    _, logits, _, _ = NaiveReuse().run(Context(model, lay))
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([chunk + layout.question])).logits[0, -1].float()
    assert torch.allclose(logits, ref, atol=1e-3), float((logits - ref).abs().max())


@pytest.mark.parametrize("how", ["delta", "pre_rope"])
def test_rerotated_chunk_equals_chunk_prefilled_at_offset(smol, layout, how):
    model, _ = smol
    chunk, p = layout.chunks[1], 37
    at0 = prefill_chunk(model, chunk, 0, pre_rope=True)
    at_p = prefill_chunk(model, chunk, p)
    moved = place(at0, p, Rotary(model), how)
    for layer, (k, ref) in enumerate(zip(moved, at_p.keys)):
        assert torch.allclose(k, ref, atol=2e-4), (layer, float((k - ref).abs().max()))
        assert torch.allclose(at0.values[layer], at_p.values[layer], atol=2e-4)
    # and the move is not the identity: the keys at 0 differ from those at p
    assert float((at0.keys[5] - at_p.keys[5]).abs().max()) > 0.1


def test_recompute_all_is_full_and_none_is_naive(smol, layout, full):
    model, _ = smol
    ref_logits, ref_k, ref_v = full
    ctx = Context(model, layout)
    cache_all, logits_all, _, _ = CacheBlend(recompute=1.0).run(ctx)
    assert torch.allclose(logits_all, ref_logits, atol=2e-3)
    for layer in (0, 10, 29):
        assert torch.allclose(cache_all.keys(layer)[:, : layout.n_context], ref_k[layer], atol=2e-3)
    cache_none, logits_none, _, notes = CacheBlend(recompute=0.0).run(ctx)
    cache_naive, logits_naive, _, _ = NaiveReuse().run(ctx)
    assert notes["selected"] == []
    # CacheBlend recomputes the layers before its check layer for every token: layer 0's
    # keys/values do not depend on the context, so this equals naive reuse up to rounding
    assert torch.allclose(logits_none, logits_naive, atol=1e-3)
    assert torch.allclose(cache_none.values(29), cache_naive.values(29), atol=1e-4)
    # naive reuse is not the full prefill (the chunks never saw each other)
    assert float((logits_naive - ref_logits).abs().max()) > 1e-2


def test_cacheblend_selects_the_highest_deviation_tokens(smol, layout, full):
    model, _ = smol
    _, ref_k, ref_v = full
    ctx = Context(model, layout)
    naive, _, _, _ = NaiveReuse().run(ctx)
    # independent: with layer 0 recomputed for every token, layer 1's fresh keys/values are the
    # full prefill's, so the deviation is the distance of the naive cache from the full one
    pos = layout.chunk_positions()
    dev = [
        float(((ref_k[1][:, p] - naive.keys(1)[:, p]) ** 2).sum())
        + float(((ref_v[1][:, p] - naive.values(1)[:, p]) ** 2).sum())
        for p in pos.tolist()
    ]
    k = 5
    expect = sorted(pos[sorted(range(len(dev)), key=lambda i: -dev[i])[:k]].tolist())
    method = CacheBlend(recompute=k / pos.numel())
    _, _, schedule, notes = method.run(ctx)
    assert notes["selected"] == expect
    assert sorted(schedule.computed[0].tolist()) == list(range(layout.n_context))  # layer 0
    assert schedule.computed[5].numel() == len(layout.header) + k


def test_select_hkvd_on_planted_deviations():
    torch.manual_seed(0)
    old_k, old_v = torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    fresh_k, fresh_v = old_k + 0.01 * torch.randn(2, 20, 8), old_v.clone()
    for t, size in ((3, 5.0), (11, 3.0), (17, 4.0)):
        fresh_v[:, t] += size
    assert select_hkvd(fresh_k, fresh_v, old_k, old_v, 3, "value").tolist() == [3, 11, 17]
    assert select_hkvd(fresh_k, fresh_v, old_k, old_v, 2, "kv").tolist() == [3, 17]
    # keys only: the planted value deviations are invisible
    assert 3 not in select_hkvd(fresh_k, fresh_v, old_k, old_v, 2, "key").tolist()


def test_prefix_overlap_counts_shared_chunks_and_order():
    assert prefix_overlap([], []) == (1.0, 1.0)
    assert prefix_overlap([0, 1], [0, 1]) == (1.0, 1.0)
    assert prefix_overlap([], [0, 1]) == (0.0, 1.0)
    assert prefix_overlap([0, 2], [0]) == (0.5, 1.0)  # the cache saw chunk 2, now gone
    beta, gamma = prefix_overlap([2, 1, 0], [0, 1, 3])
    assert beta == pytest.approx(2 / 4) and gamma == 0.0  # 0 and 1 swapped
    from methods.reuse.history import Earlier

    # earlier order 0, 2, 1 and now 0, 1, 2: chunk 0 kept its (empty) prefix, chunk 1 saw
    # {0, 2} and now {0}, chunk 2 saw {0} and now {0, 1}
    mass = [torch.tensor([0.1, 0.9, 0.3, 0.2])] * 3
    earlier = Earlier([0, 2, 1], [None] * 3, mass)
    cfo, counts = CacheCraft(recompute=0.25).plan(earlier, [4, 4, 4])
    assert cfo == pytest.approx([0.0, 0.375 * 0.5, 0.375 * 0.5])
    assert counts == [0, 2, 2]  # 25% of 12 tokens, shared by CFO; none for the exact chunk
    cfo, counts = CacheCraft(recompute=0.25, reuse_below=0.2).plan(earlier, [4, 4, 4])
    assert counts == [0, 0, 0]  # every CFO under the threshold: reuse as is


def test_kvcomm_with_an_anchor_in_the_same_context_is_the_full_prefill(smol, layout, full):
    model, _ = smol
    ref_logits, _, _ = full
    n = len(layout.chunks)
    seed = next(s for s in range(200) if anchor_orders(n, 1, s)[0] == list(range(n)))
    _, logits, _, notes = KVComm(anchors=1, anchor_seed=seed).run(Context(model, layout))
    assert notes["weights"][0] == [1.0]
    assert torch.allclose(logits, ref_logits, atol=2e-3)


@pytest.mark.parametrize(
    "spec",
    [
        "cacheblend:recompute=2",
        "cacheblend:deviation=angle",
        "cachecraft:recompute=-1",
        "kvcomm:anchors=0",
        "blend",
        "naive:x=1",
    ],
)
def test_bad_specs_give_one_line(spec):
    with pytest.raises(KvlensError) as err:
        create_reuse(spec)
    assert "\n" not in str(err.value)


def test_cachecraft_prefix_hit_needs_no_fix_and_is_the_full_prefill(smol, layout, full):
    from methods.reuse.cachecraft import history_order

    model, _ = smol
    ref_logits, _, _ = full
    n = len(layout.chunks)
    seed = next(s for s in range(200) if history_order(n, s) == list(range(n)))
    _, logits, schedule, notes = CacheCraft(recompute=0.5, history_seed=seed).run(
        Context(model, layout)
    )
    assert notes["cfo"] == [0.0] * n and notes["selected"] == []
    assert schedule.computed[-1].numel() == len(layout.header)
    assert torch.allclose(logits, ref_logits, atol=2e-3)
    # another order: the chunks that lost their prefix recompute their most outward tokens
    other = next(s for s in range(200) if history_order(n, s)[0] != 0)
    _, _, _, notes = CacheCraft(recompute=0.3, history_seed=other).run(Context(model, layout))
    assert any(c > 0 for c in notes["cfo"]) and notes["selected"]


def test_kvcomm_content_match_averages_the_anchors(smol, layout):
    model, _ = smol
    _, _, _, notes = KVComm(anchors=3, match="content").run(Context(model, layout))
    for w in notes["weights"]:
        assert w == pytest.approx([1 / 3] * 3)
    _, _, _, notes = KVComm(anchors=3).run(Context(model, layout))
    assert all(sum(w) == pytest.approx(1.0) for w in notes["weights"])
    assert any(max(w) > 0.34 for w in notes["weights"])  # prefix match tells anchors apart
