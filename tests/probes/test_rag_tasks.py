"""probes.rag_tasks with the real SmolLM2 tokenizer: chunk sizes, where the facts sit, the
two-hop link before its target, segment ids that concatenate to the prompt's, determinism,
scoring, one-line refusals."""

from __future__ import annotations

import pytest

from probes.errors import KvlensError
from probes.rag_tasks import make_rag_task


@pytest.mark.parametrize("kind", ["rag", "twohop"])
def test_chunks_hold_their_facts_at_about_the_asked_size(smol, kind):
    _, tok = smol
    task = make_rag_task(kind, tok, n_chunks=5, chunk_tokens=64, seed=3)
    header, chunks, question = task.segment_ids(tok)
    assert len(chunks) == 5 and task.prompt.startswith(task.header)
    sizes = [len(ids) for ids in chunks]
    # whole filler sentences, the last kept only where it lands closer to the asked size
    assert all(0.8 * 64 <= n <= 1.2 * 64 for n in sizes), sizes
    assert abs(sum(sizes) / len(sizes) - 64) <= 0.1 * 64, sizes
    answer = task.answers[0]
    key = task.settings["key"]
    target = task.answer_chunks[-1]
    assert f"is {answer}." in task.chunks[target]
    assert sum(answer in c for c in task.chunks) == 1
    assert question[-1] != tok.eos_token_id and task.question.endswith(f"for {key} is")
    assert task.continuation == f" {answer}."
    if kind == "rag":
        assert task.answer_chunks == [target] and key in task.chunks[target]
    else:
        link, target = task.answer_chunks
        assert link < target
        assert f"The code name {key} stands for" in task.chunks[link]
        assert key not in task.chunks[target]  # the alias alone never names the number
    # the header carries BOS where the tokenizer adds one; chunks and question do not
    plain = tok(task.header, add_special_tokens=True)["input_ids"]
    assert header == plain


def test_seeded_and_placed(smol):
    _, tok = smol
    a = make_rag_task("rag", tok, n_chunks=4, chunk_tokens=48, seed=7)
    b = make_rag_task("rag", tok, n_chunks=4, chunk_tokens=48, seed=7)
    c = make_rag_task("rag", tok, n_chunks=4, chunk_tokens=48, seed=8)
    assert a.prompt == b.prompt and a.prompt != c.prompt
    placed = make_rag_task("twohop", tok, n_chunks=4, chunk_tokens=48, answer_chunk=3)
    assert placed.answer_chunks[-1] == 3 and placed.answer_chunks[0] < 3


def test_score_counts_the_answer(smol):
    _, tok = smol
    task = make_rag_task("rag", tok, n_chunks=2, chunk_tokens=32)
    assert task.score(f" {task.answers[0]}.") == 1.0
    assert task.score(" 1234.") == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "trivia"}, "task must be one of rag, twohop"),
        ({"kind": "twohop", "n_chunks": 1}, "chunks must be in 2.."),
        ({"kind": "rag", "n_chunks": 0}, "chunks must be in 1.."),
        ({"kind": "rag", "chunk_tokens": 8}, "chunk tokens must be >= 32"),
        ({"kind": "twohop", "answer_chunk": 0}, "answer chunk must be in 1..5"),
        ({"kind": "rag", "answer_chunk": 6}, "answer chunk must be in 0..5"),
    ],
)
def test_bad_settings_are_one_line(smol, kwargs, message):
    _, tok = smol
    with pytest.raises(KvlensError) as err:
        make_rag_task(tokenizer=tok, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
