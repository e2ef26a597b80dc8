"""KVzip on the real SmolLM2: its replay scores equal the attention of a replayed context
computed independently (eager attention maps of a plain transformers run), the kept pairs are
the top of those scores, a ratio of 1 is the full cache, bad parameters give one line."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from methods.cache import CompressedCache
from methods.evaluate import compare, prefill_logits
from methods.registry import create
from probes.compat import cache_arg
from probes.errors import KvlensError
from tests.conftest import passage

N = 96
CHUNK = 40  # three chunks over N tokens: the later chunks' prompts and sinks are exercised
SINKS = 4


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    out = tok(passage(2))["input_ids"][:N]
    assert len(out) == N
    return out


def eager_scores(model, tok, ids: list[int], chunk: int, sinks: int) -> dict[str, torch.Tensor]:
    """[layers, KV heads, T]: for each chunk, a plain eager run of repeat prompt + chunk over
    the context's DynamicCache, its attention maps renormalised over sinks + chunk + replay
    (``full``: over everything), max over the KV group's query heads and every query; per
    normalisation."""

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    t = len(ids)
    n_layers = model.config.num_hidden_layers
    n_kv = model.config.num_key_value_heads
    group = model.config.num_attention_heads // n_kv
    out = {"chunk": torch.zeros(n_layers, n_kv, t), "full": torch.zeros(n_layers, n_kv, t)}
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            context = DynamicCache()
            model(input_ids=torch.tensor([ids]), **cache_arg(model, context), use_cache=True)
            for start in range(0, t, chunk):
                end = min(t, start + chunk)
                if start == 0:
                    prompt = enc("\n\nRepeat the previous context exactly.")
                else:
                    prompt = (
                        enc("\n\nRepeat the part of the previous context exactly, starting with")
                        + ids[start - 8 : start]
                    )
                replay = prompt + enc("\n") + ids[start:end]
                run = model(
                    input_ids=torch.tensor([replay]),
                    **cache_arg(model, copy.deepcopy(context)),
                    use_cache=True,
                    output_attentions=True,
                )
                keep = torch.zeros(t + len(replay), dtype=torch.bool)
                keep[: min(sinks, start)] = True
                keep[start:end] = True
                keep[t:] = True
                for layer, maps in enumerate(run.attentions):
                    whole = maps[0].float()  # [Hq, q, T + q]
                    sub = whole * keep
                    sub = sub / sub.sum(-1, keepdim=True)
                    for name, a in (("full", whole), ("chunk", sub)):
                        part = a[..., start:end]
                        for h in range(n_kv):
                            rows = part[h * group : (h + 1) * group].reshape(-1, end - start)
                            out[name][layer, h, start:end] = rows.max(0).values
    finally:
        model.set_attn_implementation("kvlens")
    return out


@pytest.fixture(scope="module")
def eager(smol, ids):
    model, tok = smol
    return eager_scores(model, tok, ids, CHUNK, SINKS)


def prefilled(model, ids, spec):
    cache = CompressedCache(model, create(spec))
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), **cache_arg(model, cache), use_cache=True)
    return cache


@pytest.mark.parametrize("normalise", ["chunk", "full"])
def test_scores_equal_eager_attention_of_the_replay(smol, ids, eager, normalise):
    model, tok = smol
    spec = f"kvzip:ratio=0.5,chunk={CHUNK},sinks={SINKS},normalise={normalise}"
    cache = prefilled(model, ids, spec)
    got = cache.method.replay_scores(model, cache, ids, tok)
    want = eager[normalise]
    assert got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=1e-4)
    # the chunked normalisation is not the whole-cache one: the parameter changes the scores
    assert (eager["full"] - eager["chunk"]).abs().max() > 1e-3


def test_kept_pairs_are_the_top_replay_scores(smol, ids, eager):
    model, tok = smol
    ratio = 0.3
    cache = CompressedCache(model, create(f"kvzip:ratio={ratio},chunk={CHUNK},sinks={SINKS}"))
    with torch.inference_mode():
        prefill_logits(model, ids, cache, tok)
    assert cache.prepared
    score = eager["chunk"].clone()
    score[..., :SINKS] = float("inf")
    n_keep = round(ratio * score.numel())
    kept = torch.zeros_like(score, dtype=torch.bool)
    for layer in range(score.shape[0]):
        for h, pos in enumerate(cache.kept_positions(layer)):
            kept[layer, h, pos] = True
    assert int(kept.sum()) == n_keep
    assert kept[..., :SINKS].all()
    edge = score.reshape(-1).sort(descending=True).values[n_keep - 1]
    # everything kept scores at least the edge, everything dropped at most (float32 ties aside)
    assert (score[kept] >= edge - 1e-5).all()
    assert (score[~kept] <= edge + 1e-5).all()
    per_head = kept.sum(-1)
    assert per_head.min() < per_head.max()  # global allocation: heads keep different counts


def test_head_level_keeps_whole_heads_and_windows(smol, ids):
    model, tok = smol
    cache = CompressedCache(model, create(f"kvzip:ratio=0.25,level=head,recent=16,chunk={CHUNK}"))
    with torch.inference_mode():
        prefill_logits(model, ids, cache, tok)
    lengths = [len(p) for layer in range(len(cache.layers)) for p in cache.kept_positions(layer)]
    whole = sum(n == N for n in lengths)
    assert whole == round(0.25 * len(lengths))
    assert all(n in (N, 4 + 16) for n in lengths)


def test_ratio_one_is_the_full_cache(smol, ids):
    model, tok = smol
    result = compare(
        model, tok, ids, "full,kvzip:ratio=1.0,kvzip:ratio=1.0,level=head", max_new_tokens=4
    )
    full = result.results[0]
    for r in result.results[1:]:
        assert r.token_ids == full.token_ids
        assert r.kl_max < 1e-6


def test_bad_parameters_and_a_missing_replay_give_one_line(smol, ids):
    model, _tok = smol
    for spec in (
        "kvzip:ratio=0",
        "kvzip:ratio=1.5",
        "kvzip:level=token",
        "kvzip:allocation=uniform",
        "kvzip:chunk=0",
        "kvzip:normalise=softmax",
    ):
        with pytest.raises(KvlensError) as err:
            create(spec)
        assert "\n" not in str(err.value) and str(err.value).startswith("kvzip:")
    cache = prefilled(model, ids, "kvzip:ratio=0.5")  # prefilled around the one path
    with pytest.raises(KvlensError, match="replay"):
        with torch.inference_mode():
            model(input_ids=torch.tensor([[ids[0]]]), **cache_arg(model, cache), use_cache=True)
    with pytest.raises(KvlensError, match="tokenizer"):
        prefill_logits(model, ids, CompressedCache(model, create("kvzip:ratio=0.5")))
