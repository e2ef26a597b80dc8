"""The retrieval-heads job on the real SmolLM2: retrieval heads (Wu et al.) are found by the
query that produces each copied token, so they are not simply the echo heads, which attend to
earlier copies of the token they were fed."""

from __future__ import annotations

from analysis.retrieval_heads import top_heads
from app.jobs import find_retrieval_heads


def test_top_retrieval_heads_are_not_the_echo_heads(smol):
    model, tok = smol
    scores = find_retrieval_heads(model, tok, lengths=[512], depths=[0.5], generate=8)
    names = {
        col: [(r["layer"], r["head"]) for r in top_heads(scores, col, 3).iter_rows(named=True)]
        for col in ("retrieval", "echo")
    }
    assert top_heads(scores, "retrieval", 1)["retrieval"][0] >= 0.5  # the needle was copied
    assert not set(names["retrieval"]) & set(names["echo"]), names
