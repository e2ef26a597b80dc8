"""The architecture matrix, methods side: one method of each family, and the X-ray, per family.

Each runs through ``compare`` on the family's tiny random-weight model (tests/architectures.py):
the compressed cache must hold fewer bytes than the full one and its next-token distributions
stay close to the full cache's (random weights give flat distributions, so a working method
stays far below the KL bound; a broken cache, e.g. mis-rotated keys, does not). Gemma 2's
soft-capped logits are refused in one line by compressed caches.
"""

from __future__ import annotations

import math

import pytest

from methods.evaluate import compare
from methods.xray import xray
from probes import KvlensError
from tests.architectures import FAMILIES, tiny_model
from tests.conftest import passage

METHODS = {  # one per family, sized for a 40-token prompt
    "eviction": "snapkv:budget=16,window=4",
    "quantisation": "kivi:bits=4,group=16,residual=8",
    "merging": "minicache:start=0,threshold=-1",  # random layers: merge every token
    "low rank": "svd:rank=8",
    "head-aware": "razor:recent=8,sinks=2",
}
COMPRESSED = [f for f in FAMILIES if f not in ("deepseek_v3", "gemma2")]
N_TOKENS = 40


@pytest.fixture(scope="module")
def prompt_ids(smol):
    return smol[1](passage(1))["input_ids"][:N_TOKENS]


@pytest.mark.parametrize("family", COMPRESSED)
@pytest.mark.parametrize("kind", list(METHODS))
def test_one_method_of_each_family_compares(family, kind, smol, prompt_ids):
    model = tiny_model(family)
    result = compare(model, smol[1], prompt_ids, ["full", METHODS[kind]], max_new_tokens=4)
    full, got = result.results
    assert got.family == kind
    assert len(got.kl_per_step) == len(full.token_ids)
    assert 0 < got.bytes < full.bytes
    assert all(math.isfinite(k) and k > -1e-6 for k in got.kl_per_step)
    assert got.kl_max < 0.05


@pytest.mark.parametrize("family", COMPRESSED)
def test_xray_runs(family, smol, prompt_ids):
    model = tiny_model(family)
    ray = xray(model, smol[1], prompt_ids, METHODS["eviction"], max_new_tokens=3)
    assert ray.n_prompt == N_TOKENS
    assert len(ray.kl_per_step) == len(ray.reference)
    # SnapKV keeps its budget of 16 per KV head after the prefill, and no more
    after_prefill = ray.kept.filter(step=ray.kept["step"].min())
    assert after_prefill["n_kept"].max() <= 16
    assert after_prefill.height == model.config.num_hidden_layers * model_kv_heads(model)


def model_kv_heads(model) -> int:
    cfg = model.config
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


@pytest.mark.parametrize("spec", [*METHODS.values()])
def test_soft_capped_attention_is_refused_by_compressed_caches(spec, smol, prompt_ids):
    with pytest.raises(KvlensError, match="soft-capping") as err:
        compare(tiny_model("gemma2"), smol[1], prompt_ids, ["full", spec], max_new_tokens=2)
    assert "\n" not in str(err.value)


def test_soft_capped_full_cache_still_compares(smol, prompt_ids):
    result = compare(tiny_model("gemma2"), smol[1], prompt_ids, ["full"], max_new_tokens=3)
    assert len(result.results[0].token_ids) == 3


@pytest.mark.parametrize("family", COMPRESSED)
def test_a_cache_that_keeps_everything_matches_the_full_cache(family, smol, prompt_ids):
    """The compressed cache path itself (storage, positions, masks, RoPE) is exact per family."""
    specs = ["full", "snapkv:budget=64"]
    result = compare(tiny_model(family), smol[1], prompt_ids, specs, max_new_tokens=4)
    full, got = result.results
    assert got.token_ids == full.token_ids
    assert got.kl_max < 1e-6
