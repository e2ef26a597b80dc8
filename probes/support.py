"""Which kvlens features a model supports, read from its architecture without running it.

The same rules the architecture matrix tests (tests/probes/test_architectures.py,
tests/methods/test_architectures.py) hold for every model of a family, so they are decided
from the model's structure alone: ``check_model`` reads a model's config (a local folder,
a GGUF file or an embedded name) and builds it on PyTorch's meta device, which allocates no
weights, so it answers in seconds even for models that would not fit in memory. The rules:
  * multi-head latent attention (DeepSeek-V2/V3: ``kv_lora_rank``) has keys and values of
    different sizes and a latent cache: nothing runs (one-line refusal);
  * pre-RoPE keys need a key projection to hook: ``k_proj``, or a fused q/k/v projection of
    known layout (Phi-3's ``qkv_proj``, GPT-NeoX's ``query_key_value``); GPT-2's ``c_attn``
    is neither;
  * compressed caches (``compare``, the X-ray, ``ask``) apply attention logit soft-capping
    (Gemma 2) like the model does, on the exact path (the decode kernels have no cap).
"""

from __future__ import annotations

from dataclasses import dataclass

from probes.errors import KvlensError
from probes.models import (
    EMBEDDED,
    ModelFacts,
    _cache_root,
    missing_key_projection,
    model_facts,
    unsupported_reason,
)

FEATURES = {
    "probe": "probe: attention statistics and maps, post-RoPE keys, values",
    "key_pre_rope": "pre-RoPE keys",
    "compare": "compressed caches: compare, ask, sweeps (every method family)",
    "xray": "compression X-ray",
    "dump": "dumps (save / load)",
}


@dataclass(frozen=True)
class Support:
    """For one model: its facts, and for each feature None (supported) or why not."""

    facts: ModelFacts
    missing: dict[str, str | None]

    def supported(self, feature: str) -> bool:
        return self.missing[feature] is None


def feature_support(model) -> Support:
    """What kvlens can do with ``model`` (loaded, or built on the meta device)."""
    reason = unsupported_reason(model)
    if reason:
        raise KvlensError(reason)
    missing = {
        "probe": None,
        "key_pre_rope": missing_key_projection(model),
        "compare": None,
        "xray": None,
        "dump": None,
    }
    return Support(facts=model_facts(model), missing=missing)


def check_model(name_or_path: str) -> Support:
    """Feature support of a model folder, GGUF file or embedded name, without loading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from probes.models import _locate

    hf_logging.set_verbosity_error()
    converted = _cache_root() / "models" / name_or_path
    fast_copy = (converted / "config.json").exists() and (converted / "kvlens.json").exists()
    if name_or_path in EMBEDDED and not fast_copy:  # read the GGUF's config, convert nothing
        entry = EMBEDDED[name_or_path]
        if not entry.installed():
            raise KvlensError(f"model '{entry.name}' is not installed; run: {entry.install}")
        gguf = entry.gguf_path()
        folder, gguf_file, label = gguf.parent, gguf.name, entry.name
    else:
        folder, gguf_file, label = _locate(name_or_path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(folder, **extra)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KvlensError(f"could not read the model config in {folder}: {first}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KvlensError(f"transformers has no causal LM for this config: {first}") from None
    model.kvlens_name = label
    return feature_support(model)
