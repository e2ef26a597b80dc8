"""What a probe produced, in words: its generated text and, for a needle-in-a-haystack task
(Kamradt's NIAH; RULER's multi-key and variable-tracking variants), the needle, the
question, the expected answer and whether the model's output contains it."""

from __future__ import annotations

import re

from probes.tasks import Task
from probes.trace import Trace

EXAMPLE = {"kind": "niah", "length": 256, "depth": 0.5, "seed": 0, "generate": 8}


def generated_text(trace: Trace) -> str:
    """The tokens the model generated after the prompt, joined as text."""
    return "".join(trace.tokens[trace.n_prompt_tokens :])


def needle_sentences(task: Task) -> list[str]:
    """The sentences of the haystack that hold an answer (the needle, or the chain)."""
    body = task.prompt.rsplit("\n\nQuestion:", 1)[0]
    found: list[str] = []
    for s in re.split(r"(?<=\.)\s+", body):
        if any(
            re.search(rf"(?<![0-9A-Za-z]){re.escape(a)}(?![0-9A-Za-z])", s) for a in task.answers
        ):
            if s.strip() not in found:
                found.append(s.strip())
    return found


def question(task: Task) -> str:
    """The question line of the task's prompt (without the 'Question:' label)."""
    match = re.search(r"Question:\s*(.*)", task.prompt)
    return match.group(1).strip() if match else ""


def describe(task: Task, trace: Trace) -> dict[str, str]:
    """Needle, question, expected answer, the model's answer, and its score, as text."""
    answer = generated_text(trace)
    return {
        "needle": " ".join(needle_sentences(task)),
        "question": question(task),
        "expected": ", ".join(task.answers),
        "answer": answer,
        "score": f"{task.score(answer):.2f}" if answer else "",
    }
