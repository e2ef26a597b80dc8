"""``reuse_compare`` on a small RAG task with the real SmolLM2: the full prefill is its own
reference (KL 0), recomputing everything matches it, naive reuse recomputes nothing and saves
most prefill FLOPs, CacheBlend recomputes the share it was given."""

from __future__ import annotations

import pytest

from methods.reuse.run import reuse_compare, task_layout
from probes.errors import KvlensError
from probes.rag_tasks import make_rag_task


@pytest.fixture(scope="module")
def run(smol):
    model, tok = smol
    task = make_rag_task("rag", tok, n_chunks=3, chunk_tokens=40, seed=1)
    specs = "full,naive,cacheblend:recompute=0.2,cacheblend:recompute=1"
    return reuse_compare(
        model, tok, task_layout(task, tok), specs, max_new_tokens=4, score=task.score,
        keep_tensors=True,
    )  # fmt: skip


def test_full_is_its_own_reference_and_recompute_all_matches_it(run):
    full, naive, blend, blend_all = run.results
    assert full.spec == "full" and full.kl_mean == 0.0 and full.recomputed == 1.0
    assert blend_all.kl_max < 1e-3 and blend_all.top1 == 1.0
    assert blend_all.token_ids == full.token_ids and blend_all.recomputed == 1.0
    # the check layer's key/value projections come on top of a full prefill
    assert -0.05 < blend_all.flops_saved < 0.0


def test_naive_recomputes_nothing_and_blend_its_share(run):
    _, naive, blend, _ = run.results
    n_chunk = sum(run.settings["chunk_lengths"])
    assert naive.recomputed == 0.0 and naive.flops_saved > 0.5
    assert blend.recomputed == pytest.approx(round(0.2 * n_chunk + 0.5) / n_chunk, abs=1 / n_chunk)
    assert naive.flops_saved > blend.flops_saved > 0.0
    assert naive.kl_mean > 0.0
    assert set(run.tensors) == {"full", naive.spec, blend.spec, run.results[3].spec}
    assert run.to_json()["results"][1]["spec"] == "naive"


def test_bad_spec_refused_before_any_work(smol):
    model, tok = smol
    task = make_rag_task("rag", tok, n_chunks=2, chunk_tokens=32)
    with pytest.raises(KvlensError, match="unknown reuse method"):
        reuse_compare(model, tok, task_layout(task, tok), "full,blend")
