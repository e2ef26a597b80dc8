"""`compare` and `kvlens compare` on the real SmolLM2."""

from __future__ import annotations

import json

import pytest

from methods.evaluate import compare
from methods.registry import create
from probes import KvlensError
from probes.tasks import make_task
from tests.app.test_cli import run
from tests.conftest import passage


def test_compare_reports_zero_divergence_for_a_lossless_budget(smol):
    model, tok = smol
    ids = tok(passage(2))["input_ids"]
    result = compare(
        model, tok, ids, "full,snapkv:budget=4096,streamingllm:budget=24", max_new_tokens=6
    )
    full, lossless, small = result.results
    assert full.kl_mean == 0 and full.bytes_ratio == 1.0
    assert lossless.kl_max < 1e-6 and lossless.top1 == 1.0 and lossless.text == full.text
    assert small.bytes < full.bytes and small.kl_mean > lossless.kl_mean
    assert len(small.kl_per_step) == len(full.token_ids)
    assert all(len(layer) == 3 for layer in small.kept_per_layer)


def test_needle_task_is_answered_by_the_full_cache(smol):
    model, tok = smol
    task = make_task("niah", 400, tok, seed=1)
    ids = tok(task.prompt)["input_ids"]
    result = compare(
        model, tok, ids, "full", max_new_tokens=10, score=task.score, continuation=task.continuation
    )
    assert (
        result.results[0].accuracy == 1.0
    )  # checked: SmolLM2 finds a 7-digit needle at 400-1000 tokens
    assert result.settings["ppl_on"] == "continuation"


def test_bad_compare_input_fails_before_any_work(smol):
    model, tok = smol
    with pytest.raises(KvlensError, match="unknown method"):
        compare(model, tok, [1, 2, 3], "full,bogus:budget=3")
    with pytest.raises(KvlensError, match="allows at most 8192"):
        compare(model, tok, [1] * 8190, "full", max_new_tokens=10)


def test_cli_compare_writes_json_and_prints_a_row_per_method(tmp_path):
    out = tmp_path / "c.json"
    result = run(
        "compare",
        "--task",
        "niah",
        "--length",
        "300",
        "--methods",
        "full,tova:budget=64",
        "--max-new-tokens",
        "4",
        "--json",
        str(out),
        "--eager-decode",  # (the CPU's default anyway; the flag must parse)
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert (
        lines[0].startswith("method")
        and lines[1].startswith("full")
        and lines[2].startswith("tova")
    )
    data = json.loads(out.read_text())
    # the JSON names every parameter, defaults included, so the run can be repeated exactly
    assert [r["spec"] for r in data["results"]] == ["full", create("tova:budget=64").spec()]
    assert "schedule=continuous" in data["results"][1]["spec"]
    assert data["settings"]["task"]["kind"] == "niah"


def test_cli_methods_lists_every_method():
    result = run("methods")
    assert result.returncode == 0
    for name in ("snapkv", "h2o", "streamingllm", "adakv", "pyramidkv", "keyformer", "random"):
        assert any(line.startswith(name) for line in result.stdout.splitlines())


def test_cli_bad_spec_is_one_line():
    result = run("compare", "--prompt", "hi", "--methods", "snapkv:budget=0")
    assert result.returncode != 0
    assert result.stderr.strip() == "kvlens: error: snapkv: budget must be >= 1 token, got 0"


def _two_separate_runs(model, tok, ids, spec, reference, n, eos):
    """The definition ``replay`` shortens: the method's greedy run and its teacher-forced run
    on two copies of one prefilled cache."""
    import torch

    from methods.cache import CompressedCache
    from methods.evaluate import greedy, prefill_logits, teacher_forced

    with torch.inference_mode():
        cache = CompressedCache(model, create(spec))
        first = prefill_logits(model, ids, cache)
        tf_cache = cache.copy()
        tokens, _ = greedy(model, first, cache, n, eos)
        tf = teacher_forced(model, first, tf_cache, reference)
    return first, tf, tokens, cache.nbytes()


@pytest.mark.parametrize(
    "spec", ["streamingllm:budget=12,sinks=4", "kivi:bits=8,group=32,residual=32"]
)
def test_shared_steps_give_the_logits_and_tokens_of_two_separate_runs(smol, spec):
    """One method leaves the reference early, one follows it: replay's teacher-forced logits,
    greedy tokens and bytes are those of two separate runs, bit for bit; an end-of-sequence
    token inside the reference stops both greedy runs there."""
    import torch
    from transformers import DynamicCache

    from methods.cache import CompressedCache
    from methods.evaluate import greedy, prefill_logits, replay

    model, tok = smol
    ids = tok(passage(1))["input_ids"]
    n = 8
    with torch.inference_mode():
        full = DynamicCache()
        reference, _ = greedy(model, prefill_logits(model, ids, full), full, n, set())
    for eos in (set(), {reference[5]}):
        ref = reference[: reference.index(reference[5]) + 1] if eos else reference
        first, tf, tokens, nbytes = _two_separate_runs(model, tok, ids, spec, ref, n, eos)
        with torch.inference_mode():
            cache = CompressedCache(model, create(spec))
            got_first = prefill_logits(model, ids, cache)
            got_tf, got_tokens, got_bytes, _ = replay(
                model, got_first, cache, ref, n, eos, lambda c: c.nbytes()
            )
        assert torch.equal(got_first, first)
        assert len(got_tf) == len(tf) == len(ref)
        assert all(torch.equal(a, b) for a, b in zip(got_tf, tf))
        assert got_tokens == tokens and got_bytes == nbytes
    shared = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(ref))
    assert (shared <= 2) == spec.startswith("streamingllm"), (spec, tokens, ref)


def test_compare_reports_what_two_separate_runs_give(smol):
    import math

    import torch
    from transformers import DynamicCache

    from methods.evaluate import _nll, divergence, greedy, prefill_logits

    model, tok = smol
    ids = tok(passage(1))["input_ids"]
    spec = "snapkv:budget=16,window=4"
    full, got = compare(model, tok, ids, ["full", spec], max_new_tokens=6).results
    eos = {tok.eos_token_id}
    with torch.inference_mode():
        cache = DynamicCache()
        ref, ref_logits = greedy(model, prefill_logits(model, ids, cache), cache, 6, eos)
    _, tf, tokens, nbytes = _two_separate_runs(model, tok, ids, spec, ref, 6, eos)
    kls, agree = divergence(ref_logits, tf)
    assert full.token_ids == ref
    assert got.token_ids == tokens and got.bytes == nbytes
    assert got.kl_per_step == kls and got.top1_per_step == agree
    assert got.ppl == math.exp(_nll(tf, ref))
