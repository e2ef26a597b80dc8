"""probes.support and ``kvlens models --check``: the matrix's rules for one model, from its config.

The rules are checked against what the architecture matrix observes: a feature reported as
supported works on the family's tiny model, one reported missing raises (see
tests/probes/test_architectures.py and tests/methods/test_architectures.py for the runs).
"""

from __future__ import annotations

import time

import pytest
import transformers

from probes import KvlensError
from probes.support import FEATURES, check_model, feature_support
from tests.app.test_cli import run
from tests.architectures import _configs, tiny_model

EXPECTED_MISSING = {  # family -> features kvlens refuses for it (the README's matrix)
    "llama": set(),
    "mistral": set(),
    "qwen2": set(),
    "qwen3": set(),
    "gemma2": set(),
    "gemma3": set(),
    "phi": set(),
    "phi3": set(),
    "olmo2": set(),
    "gpt_neox": set(),
    "gpt2": {"key_pre_rope"},
}


def _config_folder(family: str, folder):
    config_name, _, kwargs = _configs()[family]
    getattr(transformers, config_name)(**kwargs).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", list(EXPECTED_MISSING))
def test_support_from_the_config_alone_matches_the_loaded_model(family, tmp_path):
    from_config = check_model(str(_config_folder(family, tmp_path)))
    loaded = feature_support(tiny_model(family))
    assert {f for f in FEATURES if not from_config.supported(f)} == EXPECTED_MISSING[family]
    assert from_config.missing == loaded.missing
    assert from_config.facts.n_layers == loaded.facts.n_layers
    assert from_config.facts.head_dim == loaded.facts.head_dim


def test_latent_attention_is_refused_from_the_config(tmp_path):
    with pytest.raises(KvlensError, match="multi-head latent attention") as err:
        check_model(str(_config_folder("deepseek_v3", tmp_path)))
    assert "\n" not in str(err.value)


def test_cli_check_prints_the_features_of_one_model(tmp_path):
    folder = _config_folder("gpt2", tmp_path / "gpt2")
    t0 = time.perf_counter()
    result = run("models", "--check", str(folder))
    elapsed = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "GPT2LMHeadModel" in lines[0]
    row = next(x for x in lines if x.strip().startswith(FEATURES["key_pre_rope"]))
    assert "no: " in row and "no key projection kvlens can hook" in row
    row = next(x for x in lines if x.strip().startswith(FEATURES["compare"]))
    assert row.rstrip().endswith("yes")
    assert elapsed < 60  # no weights are loaded


def test_cli_check_refuses_latent_attention_in_one_line(tmp_path):
    result = run("models", "--check", str(_config_folder("deepseek_v3", tmp_path / "mla")))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "multi-head latent attention" in result.stderr
