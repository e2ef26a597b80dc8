"""Resource refusals, concurrent users of one cached model, paths and escaping."""

from __future__ import annotations

import threading

import pytest
import torch

from methods.evaluate import compare
from probes import KvlensError, capture
from tests.conftest import passage


def test_a_probe_that_cannot_fit_is_refused_with_a_suggestion(smol):
    model, tok = smol
    ids = tok(passage(140))["input_ids"][:8000]
    # full maps of 30 layers x 9 heads x 8000^2 in float16 are ~32 GiB, more than this machine has
    with pytest.raises(KvlensError) as info:
        capture(model, tok, ids, attention="full")
    message = str(info.value)
    assert "GiB" in message and "--attention stats" in message and "\n" not in message


def _run_threads(jobs):
    results, errors = [None] * len(jobs), []

    def run(i, job):
        try:
            results[i] = job()
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return results


def test_two_concurrent_probes_equal_each_run_alone(smol):
    model, tok = smol
    a_text, b_text = passage(2), "A different prompt about " + "rivers and roads. " * 20
    alone_a = capture(model, tok, a_text, attention="stats")
    alone_b = capture(model, tok, b_text, attention="stats", layers=[3, 4])
    together = _run_threads(
        [
            lambda: capture(model, tok, a_text, attention="stats"),
            lambda: capture(model, tok, b_text, attention="stats", layers=[3, 4]),
        ]
    )
    for alone, both in zip((alone_a, alone_b), together):
        assert both.token_ids == alone.token_ids
        assert both.layers == alone.layers
        assert both.key_stats.equals(alone.key_stats)
        for name, t in alone.tensors.items():
            assert torch.equal(both.tensors[name], t), name


def test_two_concurrent_comparisons_equal_each_run_alone(smol):
    model, tok = smol
    a = tok(passage(2))["input_ids"]
    b = tok("Rivers and roads. " * 30)["input_ids"]
    specs_a, specs_b = "full,snapkv:budget=32", "full,h2o:budget=24"
    alone = [
        compare(model, tok, a, specs_a, max_new_tokens=5),
        compare(model, tok, b, specs_b, max_new_tokens=5),
    ]
    together = _run_threads(
        [
            lambda: compare(model, tok, a, specs_a, max_new_tokens=5),
            lambda: compare(model, tok, b, specs_b, max_new_tokens=5),
        ]
    )
    for one, both in zip(alone, together):
        for r1, r2 in zip(one.results, both.results):
            assert r1.token_ids == r2.token_ids and r1.bytes == r2.bytes
            assert r1.kl_per_step == pytest.approx(r2.kl_per_step, abs=1e-5)


def test_app_dump_paths_stay_inside_the_dump_folder(tmp_path, monkeypatch):
    from app import state

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache_dumps").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "cache_dumps" / "link").symlink_to(outside)
    for bad in ("../outside", "/etc/passwd", "link", "..", "a/../../b"):
        with pytest.raises(KvlensError):
            state.safe_dump_path(bad)
    assert state.safe_dump_path("fine").parent == (tmp_path / "cache_dumps").resolve()


def test_figures_escape_token_text():
    from app import figures

    tokens = ["<b>bold</b>", '<a href="javascript:alert(1)">x</a>', "ok"]
    fig = figures.token_scores(
        [0, 1, 2], tokens, [0.1, 0.2, 0.3], "title with <script>alert(1)</script>"
    )
    text = fig.to_json()
    assert "<script>" not in text and "<a href" not in text and "<b>" not in text
    assert "&lt;b&gt;" in text


def test_cli_prints_generated_text_without_control_characters():
    from app.cli import _one_line

    shown = repr(_one_line("evil \x1b[31mred\x1b[0m text\nnext", 60))
    assert "\x1b" not in shown
