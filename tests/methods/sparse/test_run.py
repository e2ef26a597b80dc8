"""sparse_compare on SmolLM2: recall is 1 where every page is read, the logged reads are the
method's selections, the oracle is the ceiling of an equal read, refusals are one line."""

from __future__ import annotations

import pytest

from methods.sparse.run import sparse_compare
from probes.errors import KvlensError
from tests.conftest import passage


@pytest.fixture(scope="module")
def runs(smol):
    model, tok = smol
    ids = tok(passage(3))["input_ids"]
    specs = "full,quest:budget=100000,quest:budget=32,oracle:budget=32"
    return ids, sparse_compare(model, tok, ids, specs, max_new_tokens=4)


def test_recall_is_one_when_every_page_is_read(runs):
    _, (every, _, _) = runs
    assert every.recall["recall"].min() == pytest.approx(1.0, abs=1e-5)
    assert every.recall["output_error"].max() == pytest.approx(0.0, abs=1e-5)
    assert every.kl_per_step[0] == pytest.approx(0.0, abs=1e-6)
    assert max(every.kl_per_step) < 1e-4


def test_logged_reads_are_the_selection_and_steps_follow_the_decoding(runs):
    ids, (_, quest, oracle) = runs
    n = len(ids)
    assert quest.recall.height == 30 * 9 * 3  # layers x query heads x 3 decoding steps
    assert sorted(quest.reads["step"].unique()) == [1, 2, 3]
    for row in quest.reads.filter(quest.reads["layer"] >= 2).iter_rows(named=True):
        held = row["n_held"]
        assert held == n + row["step"] and len(row["positions"]) <= 32
        assert (held - 1) in row["positions"]  # the current page is read
    # the per-query-head ceiling is never below the selection of the same size
    assert (oracle.recall["oracle_recall"] >= oracle.recall["recall"] - 1e-6).all()
    assert oracle.summary()["tokens_read"] == pytest.approx(32.0)


def test_non_sparse_methods_and_short_runs_are_refused_in_one_line(smol):
    model, tok = smol
    for specs, n in (("snapkv:budget=32", 4), ("full", 4), ("quest:budget=32", 1)):
        with pytest.raises(KvlensError) as err:
            sparse_compare(model, tok, [1, 2, 3], specs, max_new_tokens=n)
        assert "\n" not in str(err.value)
