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
