"""Synthetic long-context tasks in the style of RULER, generated here from a seed.

The haystack is filler prose that kvlens composes itself from small word lists (no third-
party text), so every task is reproducible and free to ship. Kinds:
  niah      one needle "The special magic number for <key> is <number>." at a depth;
  multikey  several such needles with different keys; the question asks for one;
  vartrack  a chain of variable assignments hidden in the haystack; name every variable
            that ends up holding the value.
Each Task carries its prompt, the answers a correct output must contain, and the gold
continuation text (used for perplexity).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from probes.errors import KvlensError

TASK_KINDS = ("niah", "multikey", "vartrack")

_SUBJECTS = [
    "The river",
    "A small village",
    "The old library",
    "Our garden",
    "The northern road",
    "A quiet harbour",
    "The market square",
    "The mountain path",
    "An empty station",
    "The school choir",
    "A travelling merchant",
    "The baker's cart",
]
_VERBS = [
    "was quiet",
    "filled with light",
    "grew busy",
    "stayed cold",
    "looked different",
    "smelled of rain",
    "seemed older",
    "became crowded",
    "felt peaceful",
    "was repainted",
]
_TIMES = [
    "in the morning",
    "after the storm",
    "during the festival",
    "before winter",
    "on most evenings",
    "in early spring",
    "at noon",
    "late at night",
    "every Sunday",
]
_TAILS = [
    "and nobody minded.",
    "as it always had.",
    "which surprised the visitors.",
    "while birds circled overhead.",
    "so the children stayed inside.",
    "and the shops closed early.",
    "as the bells rang twice.",
]
_KEYS = [
    "amber-fox",
    "silver-lake",
    "quiet-oak",
    "red-harbor",
    "northern-star",
    "paper-moon",
    "iron-gate",
    "blue-cedar",
    "tall-grass",
    "stone-bridge",
    "late-train",
    "wild-plum",
]


@dataclass
class Task:
    kind: str
    prompt: str
    answers: list[str]
    continuation: str
    settings: dict = field(default_factory=dict)

    def score(self, generated: str) -> float:
        """Fraction of the answers that appear in ``generated`` (case-insensitive)."""
        text = generated.lower()
        return sum(a.lower() in text for a in self.answers) / len(self.answers)


def _filler(rng: random.Random) -> str:
    return (
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_TIMES)}, {rng.choice(_TAILS)}"
    )


def _haystack(
    rng: random.Random, n_tokens: int, count_tokens, inserts: list[tuple[float, str]]
) -> str:
    """Filler sentences up to about ``n_tokens`` tokens with sentences inserted at depths."""
    sentences: list[str] = []
    while count_tokens(" ".join(sentences)) < n_tokens:
        sentences.extend(_filler(rng) for _ in range(8))
    while len(sentences) > 1 and count_tokens(" ".join(sentences)) > n_tokens:
        sentences.pop()
    for depth, text in sorted(inserts, key=lambda x: -x[0]):
        sentences.insert(round(depth * len(sentences)), text)
    return " ".join(sentences)


def make_task(
    kind: str,
    n_tokens: int,
    tokenizer,
    *,
    depth: float = 0.5,
    seed: int = 0,
    n_keys: int = 4,
    n_hops: int = 3,
) -> Task:
    """Build one task whose haystack is about ``n_tokens`` tokens long."""
    if kind not in TASK_KINDS:
        raise KvlensError(f"task must be one of {', '.join(TASK_KINDS)}, not '{kind}'")
    if not 0.0 <= depth <= 1.0:
        raise KvlensError(f"depth must be in [0, 1], got {depth}")
    if n_tokens < 64:
        raise KvlensError(f"task length must be >= 64 tokens, got {n_tokens}")
    rng = random.Random(f"{kind}-{n_tokens}-{depth}-{seed}")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    settings = {"kind": kind, "n_tokens": n_tokens, "depth": depth, "seed": seed}
    if kind in ("niah", "multikey"):
        keys = rng.sample(_KEYS, 1 if kind == "niah" else max(2, min(n_keys, len(_KEYS))))
        numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        asked = rng.randrange(len(keys))
        depths = [depth] + [rng.random() for _ in keys[1:]]
        needles = [
            (d, f"The special magic number for {k} is {n}.")
            for d, k, n in zip(depths, keys, numbers)
        ]
        hay = _haystack(rng, n_tokens, count, needles)
        key, number = keys[asked], numbers[asked]
        prompt = (
            f"Read the text and remember the special magic numbers.\n\n{hay}\n\n"
            f"Question: What is the special magic number for {key}?\n"
            f"Answer: The special magic number for {key} is"
        )
        return Task(kind, prompt, [number], f" {number}.", settings | {"key": key})
    names = [
        f"VAR_{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.randint(10, 99)}"
        for _ in range(n_hops + 1)
    ]
    names = list(dict.fromkeys(names))
    value = str(rng.randint(10000, 99999))
    chain = [f"{names[0]} = {value}."] + [f"{b} = {a}." for a, b in zip(names, names[1:])]
    steps = [(depth + (1 - depth) * i / (2 * len(chain)), s) for i, s in enumerate(chain)]
    hay = _haystack(rng, n_tokens, count, steps)
    prompt = (
        f"Track the variable assignments in the text.\n\n{hay}\n\n"
        f"Question: Which variables hold the value {value}?\nAnswer: VAR_"
    )
    # the prompt ends in "VAR_", so answers are the names without that prefix
    bare = [n.removeprefix("VAR_") for n in names]
    return Task(
        kind, prompt, bare, bare[0] + ", " + ", ".join(names[1:]) + ".", settings | {"value": value}
    )


def context_and_question(task: Task) -> tuple[str, str]:
    """A niah or multikey task's prompt cut where its question starts: (context, question),
    so a method can compress the context before the question is seen."""
    cut = task.prompt.rfind("\n\nQuestion:")
    if task.kind not in ("niah", "multikey") or cut < 0:
        raise KvlensError(f"a {task.kind} task has no question to hold back")
    return task.prompt[:cut], task.prompt[cut:]


def repeated_random_tokens(
    period: int, vocab_size: int, seed: int = 0, prefix: list[int] | None = None, low: int = 1000
) -> tuple[list[int], int]:
    """Token ids: ``prefix`` then ``period`` random ids repeated twice; returns (ids, offset).

    Ids are drawn from ``[low, vocab_size)`` to stay clear of special tokens.
    """
    if period < 2:
        raise KvlensError(f"period must be >= 2, got {period}")
    rng = random.Random(seed)
    block = [rng.randrange(low, vocab_size) for _ in range(period)]
    prefix = list(prefix or [])
    return prefix + block + block, len(prefix)


def needle_token_positions(tokenizer, prompt: str, needle_text: str) -> list[int]:
    """Positions of the tokens of the last occurrence of ``needle_text`` in ``prompt``."""
    start = prompt.rfind(needle_text)
    if start < 0:
        raise KvlensError(f"needle text {needle_text!r} is not in the prompt")
    end = start + len(needle_text)
    enc = tokenizer(prompt, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > start and a < end and b > a]


@dataclass
class QATask:
    """One context and several questions about it, each with its gold answer."""

    context: str
    questions: list[str]
    answers: list[str]
    settings: dict = field(default_factory=dict)


def make_qa_task(n_tokens: int, tokenizer, *, n_keys: int = 4, seed: int = 0) -> QATask:
    """A haystack holding ``n_keys`` magic-number needles, and one question per needle."""
    if n_tokens < 64:
        raise KvlensError(f"task length must be >= 64 tokens, got {n_tokens}")
    if not 1 <= n_keys <= len(_KEYS):
        raise KvlensError(f"n_keys must be in 1..{len(_KEYS)}, got {n_keys}")
    rng = random.Random(f"qa-{n_tokens}-{n_keys}-{seed}")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    keys = rng.sample(_KEYS, n_keys)
    numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    needles = [
        (rng.random(), f"The special magic number for {k} is {v}.") for k, v in zip(keys, numbers)
    ]
    context = "Read the text and remember the special magic numbers.\n\n" + _haystack(
        rng, n_tokens, count, needles
    )
    questions = [
        f"\n\nQuestion: What is the special magic number for {k}?\n"
        f"Answer: The special magic number for {k} is"
        for k in keys
    ]
    return QATask(
        context, questions, numbers, {"n_tokens": n_tokens, "n_keys": n_keys, "seed": seed}
    )
