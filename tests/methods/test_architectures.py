"""The architecture matrix, methods side: one method of each family, and the X-ray, per family.

Each runs through ``compare`` on the family's tiny random-weight model (tests/architectures.py):
the compressed cache must hold fewer bytes than the full one and its next-token distributions
stay close to the full cache's (random weights give flat distributions, so a working method
stays far below the KL bound; a broken cache, e.g. mis-rotated keys, does not). Gemma 2's
soft-capped logits are applied by compressed caches too (checked with a strong cap).
"""

from __future__ import annotations

import math

import pytest
import torch

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
COMPRESSED = [f for f in FAMILIES if f != "deepseek_v3"]
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


def test_soft_capped_attention_is_exact_in_compressed_caches(smol, prompt_ids):
    """Gemma 2 caps attention logits (cap * tanh(s / cap)); with a cap of 0.5, far inside the
    range of the scores, a compressed cache that ignored it would not match the full cache."""
    import transformers

    from probes.models import wrap_model
    from tests.architectures import _configs

    config_name, model_name, kwargs = _configs()["gemma2"]
    config = getattr(transformers, config_name)(**{**kwargs, "attn_logit_softcapping": 0.5})
    torch.manual_seed(0)
    model = wrap_model(getattr(transformers, model_name)(config).float().eval(), name="capped")
    with torch.no_grad():  # random weights give tiny scores; make them large enough to cap
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
    specs = ["full", "snapkv:budget=64", "kivi:bits=8,group=16,residual=8"]
    full, kept_all, kivi = compare(model, smol[1], prompt_ids, specs, max_new_tokens=4).results
    assert kept_all.token_ids == full.token_ids and kept_all.kl_max < 1e-6
    assert kivi.kl_max < 0.05


@pytest.mark.parametrize("family", COMPRESSED)
def test_a_cache_that_keeps_everything_matches_the_full_cache(family, smol, prompt_ids):
    """The compressed cache path itself (storage, positions, masks, RoPE) is exact per family."""
    specs = ["full", "snapkv:budget=64"]
    result = compare(tiny_model(family), smol[1], prompt_ids, specs, max_new_tokens=4)
    full, got = result.results
    assert got.token_ids == full.token_ids
    assert got.kl_max < 1e-6


@pytest.mark.parametrize("family", COMPRESSED)
def test_kvquant_undoes_each_family_s_rope(family, smol, prompt_ids):
    """KVQuant quantises pre-RoPE keys: it un-rotates with the model's own RoPE (per layer
    type in Gemma 3, only the rotary channels under partial rotary); at 8 bits it stays close
    to the full cache. GPT-2 has no RoPE: one line says so."""
    model = tiny_model(family)
    specs = ["full", "kvquant:bits=8,outliers=0.01"]
    if getattr(model.base_model, "rotary_emb", None) is None:
        with pytest.raises(KvlensError, match="rotary") as err:
            compare(model, smol[1], prompt_ids, specs, max_new_tokens=2)
        assert "\n" not in str(err.value)
        return
    got = compare(model, smol[1], prompt_ids, specs, max_new_tokens=3).results[1]
    assert got.kl_max < 0.05
