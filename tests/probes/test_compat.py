"""probes.compat: kvlens hands caches to transformers by the name the installed release expects.

Two guards against the next rename: no kvlens source passes ``past_key_values`` (or reads it
from an output) outside probes/compat.py, and a probe, a comparison and ``generate`` over a
compressed cache run with every transformers deprecation warning raised as an error.
"""

from __future__ import annotations

import ast
import inspect
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from methods.cache import CompressedCache
from methods.evaluate import compare
from methods.registry import create
from probes import capture
from probes.compat import OLD_NAME, cache_arg, cache_keyword, output_cache
from tests.architectures import tiny_model

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "probes",
    "analysis",
    "methods",
    "kvlens_kernels",
    "app",
    "pages",
    "benchmarks",
    "tests",
)
# the one place that knows both names, and a script whose kvpress side runs in another
# environment, under the older transformers kvpress pins
EXEMPT = {ROOT / "probes" / "compat.py", ROOT / "benchmarks" / "parity_kvpress.py"}


def test_cache_keyword_is_the_one_forward_takes():
    model = tiny_model("llama")
    params = inspect.signature(type(model).forward).parameters
    assert cache_keyword(model) in params
    assert cache_keyword(model) == cache_keyword()  # the library default agrees
    assert list(cache_arg(model, "x")) == [cache_keyword(model)]


def _old_name_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == OLD_NAME:
            found.append(f"{path.relative_to(ROOT)}:{node.value.lineno} {OLD_NAME}=")
        if isinstance(node, ast.Attribute) and node.attr == OLD_NAME:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{OLD_NAME}")
    return found


def test_no_kvlens_code_names_the_deprecated_cache_argument():
    if cache_keyword() == OLD_NAME:
        pytest.skip("the installed transformers still names the cache past_key_values")
    uses = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path not in EXEMPT:
                uses += _old_name_uses(path)
    assert not uses, "use probes.compat.cache_arg / output_cache instead: " + "; ".join(uses)


def test_kvlens_calls_raise_no_transformers_deprecation(smol):
    model, tok = tiny_model("llama"), smol[1]
    ids = tok("The keeper counted seventeen waves that broke over the rocks.")["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        trace = capture(model, tok, ids, attention="stats", generate=2)
        result = compare(model, tok, ids, ["full", "snapkv:budget=8,window=4"], max_new_tokens=3)
        cache = CompressedCache(model, create("kivi:bits=4,group=8,residual=4"))
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), **cache_arg(model, cache), max_new_tokens=3, do_sample=False
            )
            dense = model(torch.tensor([ids]), **cache_arg(model, DynamicCache()), use_cache=True)
    assert trace.n_tokens == len(ids) + 2
    assert len(result.results) == 2
    assert out.shape[1] == len(ids) + 3
    assert cache.get_seq_length() >= len(ids)
    assert output_cache(dense).get_seq_length() == len(ids)
