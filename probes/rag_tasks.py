"""Multi-document question answering for chunk-cache reuse (CacheBlend, Cache-Craft, KVCOMM).

A retrieval-augmented prompt: a header, N document chunks of kvlens's own filler prose (from
``probes.tasks``), then a question. Every chunk holds one fact about a different key, so the
others are distractors. Kinds:
  rag     the answer is one chunk's magic number;
  twohop  one chunk says which key the asked key stands for, a later chunk holds that key's
          number: the answer needs both, and a chunk cached alone never saw the first.
Each segment is tokenized on its own and the prompt's ids are their concatenation, so a chunk's
tokens are the same in every prompt it appears in (what a chunk cache is keyed by).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from probes.errors import KvlensError
from probes.tasks import _KEYS, _filler

RAG_KINDS = ("rag", "twohop")
HEADER = "Answer the question using the documents below.\n\n"


@dataclass
class RagTask:
    kind: str
    header: str
    chunks: list[str]
    question: str
    answers: list[str]
    continuation: str
    #: which chunks hold the facts the answer needs
    answer_chunks: list[int]
    settings: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.header + "".join(self.chunks) + self.question

    def score(self, generated: str) -> float:
        text = generated.lower()
        return sum(a.lower() in text for a in self.answers) / len(self.answers)

    def segment_ids(self, tokenizer) -> tuple[list[int], list[list[int]], list[int]]:
        """(header ids, one id list per chunk, question ids); the header carries the
        tokenizer's special tokens (BOS where it adds one)."""
        header = tokenizer(self.header, add_special_tokens=True)["input_ids"]
        chunks = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in self.chunks]
        question = tokenizer(self.question, add_special_tokens=False)["input_ids"]
        return list(header), [list(c) for c in chunks], list(question)


def _chunk_text(rng: random.Random, n_tokens: int, count, fact: str, depth: float) -> str:
    sentences: list[str] = []
    while count(" ".join(sentences + [fact])) < n_tokens:
        sentences.append(_filler(rng))
    if len(sentences) > 1:  # the last sentence stays only if it brings the chunk closer
        over = count(" ".join(sentences + [fact])) - n_tokens
        under = n_tokens - count(" ".join(sentences[:-1] + [fact]))
        if under < over:
            sentences.pop()
    sentences.insert(round(depth * len(sentences)), fact)
    return " ".join(sentences) + "\n\n"


def check_rag_settings(
    kind: str, n_chunks: int, chunk_tokens: int, answer_chunk: int | None = None
) -> None:
    """Refuse settings ``make_rag_task`` cannot build (one line), without a tokenizer."""
    if kind not in RAG_KINDS:
        raise KvlensError(f"task must be one of {', '.join(RAG_KINDS)}, not '{kind}'")
    low = 2 if kind == "twohop" else 1
    if not low <= n_chunks <= len(_KEYS) - 1:
        raise KvlensError(f"{kind}: chunks must be in {low}..{len(_KEYS) - 1}, got {n_chunks}")
    if chunk_tokens < 32:
        raise KvlensError(f"chunk tokens must be >= 32, got {chunk_tokens}")
    if answer_chunk is not None and not low - 1 <= answer_chunk < n_chunks:
        raise KvlensError(f"answer chunk must be in {low - 1}..{n_chunks - 1}, got {answer_chunk}")


def make_rag_task(
    kind: str,
    tokenizer,
    *,
    n_chunks: int = 6,
    chunk_tokens: int = 256,
    answer_chunk: int | None = None,
    seed: int = 0,
) -> RagTask:
    """A ``kind`` task of ``n_chunks`` chunks of about ``chunk_tokens`` tokens each.

    ``answer_chunk`` places the (last) fact the answer needs; by default a random chunk
    (for ``twohop``, the link sits in a random earlier chunk)."""
    check_rag_settings(kind, n_chunks, chunk_tokens, answer_chunk)
    low = 2 if kind == "twohop" else 1
    rng = random.Random(f"{kind}-{n_chunks}-{chunk_tokens}-{answer_chunk}-{seed}")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    keys = rng.sample(_KEYS, n_chunks + 1)
    numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    facts = [f"The special magic number for {k} is {n}." for k, n in zip(keys, numbers)]
    target = rng.randrange(low - 1, n_chunks) if answer_chunk is None else answer_chunk
    asked, answer = keys[target], numbers[target]
    needed = [target]
    if kind == "twohop":
        # the asked key is an alias (keys[-1], given no number) of the target chunk's key
        link = rng.randrange(0, target)
        alias = keys[-1]
        facts[link] = f"The code name {alias} stands for {keys[target]}."
        asked, needed = alias, [link, target]
    chunks = [
        _chunk_text(rng, chunk_tokens, count, facts[i], rng.random()) for i in range(n_chunks)
    ]
    question = (
        f"Question: What is the special magic number for {asked}?\n"
        f"Answer: The special magic number for {asked} is"
    )
    settings = {
        "kind": kind,
        "n_chunks": n_chunks,
        "chunk_tokens": chunk_tokens,
        "seed": seed,
        "key": asked,
        "answer_chunks": needed,
    }
    return RagTask(kind, HEADER, chunks, question, [answer], f" {answer}.", needed, settings)
