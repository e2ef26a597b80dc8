"""Masked prefill inside SmolLM2 (XAttention / vertical-slash / PSA through kvlens's attention
path), then normal decoding: a full mask gives the full run; sparse masks are logged per layer
and leave no hand-over behind."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from analysis.prefill_sparse import PSA, VerticalSlash, XAttention
from methods.evaluate import prefill_logits
from methods.sparse.prefill import masked_prefill, prefill_compare
from probes.capture import tokenize
from tests.conftest import passage


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_masked_prefill_full_mask_is_the_full_run_and_sparse_masks_are_logged(smol):
    model, tok = smol
    ids = tokenize(tok, passage(2) + "The colour of the door was")
    full, runs = prefill_compare(
        model,
        tok,
        ids,
        [
            XAttention(block=16, stride=8, threshold=1.0),
            VerticalSlash(last_q=16, vertical=8, slash=8),
            PSA(block=16, stride=8, thresholds=(0.5, 0.8)),
        ],
        max_new_tokens=3,
        score=lambda text: float("blue" in text),
    )
    dense, vs, psa = runs
    assert dense.text == full.text and dense.top1 == 1.0
    assert max(dense.kl_per_step) < 1e-6
    assert all(d["density"] == pytest.approx(1.0) for _, d in dense.per_layer)
    for run in (vs, psa):
        assert [layer for layer, _ in run.per_layer] == list(range(30))  # prefill only
        assert all(0 < d["density"] < 1 for _, d in run.per_layer)
        assert run.summary()["kl_mean"] > 0 and len(run.kl_per_step) == len(full.kl_per_step)
    # outside the context the hooks are inert: a plain prefill is the full one again
    with torch.inference_mode():
        a = prefill_logits(model, ids, DynamicCache())
        with masked_prefill(model, VerticalSlash(last_q=8, vertical=4, slash=4)) as mp:
            b = prefill_logits(model, ids, DynamicCache())
        c = prefill_logits(model, ids, DynamicCache())
    assert len(mp.log) == 30 and torch.equal(a, c) and not torch.equal(a, b)
