"""Shared fixtures: the real embedded SmolLM2 model, loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PASSAGE = (
    "The lighthouse keeper wrote in his log every evening. On Monday the sea was calm and "
    "three fishing boats returned before dark. On Tuesday a storm came from the west, and "
    "the keeper counted seventeen waves that broke over the northern rocks. His daughter "
    "Mira painted the door blue, because blue was the colour her mother had loved. "
)


def passage(n_repeats: int) -> str:
    """Deterministic natural text of about 60 tokens per repeat."""
    return PASSAGE * n_repeats


@pytest.fixture(scope="session")
def smol():
    from probes import load_model

    model, tokenizer = load_model("smollm2-135m", device="cpu")
    return model, tokenizer


@pytest.fixture(scope="session")
def gemma():
    """Gemma 3 270M (sliding-window and full layers), loaded once for the whole run."""
    from probes import load_model

    return load_model("gemma3-270m", device="cpu")
